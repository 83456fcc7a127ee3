import pytest

from gpt2jax.data.normalize import normalize_text, strip_hebrew_marks
from gpt2jax.errors import UserError
from gpt2jax.tokenizer import (CharTokenizer, SentencePieceTokenizer, load_tokenizer,
                               tokenizer_fingerprint)

HEBREW_POINTED = "בְּרֵאשִׁ֖ית בָּרָ֣א אֱלֹהִ֑ים אֵ֥ת הַשָּׁמַ֖יִם׃"
SAMPLES = [
    HEBREW_POINTED,
    strip_hebrew_marks(HEBREW_POINTED),
    "שָׁלוֹם, עוֹלָם!\nשלום עולם",
    "English text with  double  spaces,\ttabs\tand\nnew\n\nlines.\n",
    "Digits 0123456789 and 3.14159; year 2026.",
    "Emoji 😀🚀 and ünïcödé — “quotes” ‘here’",
    "  leading and trailing spaces  ",
    "literal meta symbol ▁ kept ▁▁ as is",
    "\n\n\t",
    "中文 العربية Ελληνικά",  # characters the tokenizer never saw: byte fallback
]
CORPUS = [normalize_text(s) for s in SAMPLES[:6]] * 30


@pytest.fixture(scope="module")
def bpe():
  return SentencePieceTokenizer.train(CORPUS, vocab_size=400)


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trip_is_exact(bpe, text):
  ids = bpe.encode(text)
  assert bpe.decode(ids) == text
  assert 0 not in ids  # byte fallback: never <unk>


def test_bpe_batch_encoding_equals_single(bpe):
  assert bpe.encode_batch(SAMPLES) == [bpe.encode(s) for s in SAMPLES]


def test_bpe_special_ids_are_explicit_and_never_produced_by_text(bpe):
  assert (bpe.eos_id, bpe.pad_id) == (1, 2)
  ids = bpe.encode("".join(SAMPLES) + "</s><pad>")
  assert bpe.eos_id not in ids and bpe.pad_id not in ids


def test_bpe_merges_frequent_text_into_fewer_tokens_than_characters(bpe):
  assert len(bpe.encode(SAMPLES[3])) < 0.8 * len(SAMPLES[3])


def test_bpe_save_and_load(bpe, tmp_path):
  bpe.save(tmp_path)
  loaded = load_tokenizer(tmp_path)
  assert loaded.encode(SAMPLES[0]) == bpe.encode(SAMPLES[0])
  assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(bpe)


def test_bpe_vocab_too_large_names_the_fix():
  with pytest.raises(UserError, match="too large.*tokenizer.vocab_size"):
    SentencePieceTokenizer.train(["tiny corpus"] * 3, vocab_size=50_000)


def test_bpe_vocab_too_small_names_the_fix():
  with pytest.raises(UserError, match="too small.*tokenizer.vocab_size"):
    SentencePieceTokenizer.train(CORPUS, vocab_size=100)


@pytest.mark.parametrize("text", SAMPLES[:6])
def test_char_round_trip_is_exact(text):
  tokenizer = CharTokenizer.train(SAMPLES)
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_char_vocabulary_and_special_ids(tmp_path):
  tokenizer = CharTokenizer.train(["abcab", "ba\n"])
  assert tokenizer.chars == "\nabc"
  assert (tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (4, 5, 6)
  tokenizer.save(tmp_path)
  assert load_tokenizer(tmp_path).encode("cab") == [3, 1, 2]


def test_char_unknown_character_is_named():
  tokenizer = CharTokenizer.train(["hello"])
  with pytest.raises(UserError, match=r"'ש' \(U\+05E9 HEBREW LETTER SHIN\)"):
    tokenizer.encode("helloש")


def test_strip_hebrew_marks_keeps_letters_and_punctuation():
  assert strip_hebrew_marks(HEBREW_POINTED) == "בראשית ברא אלהים את השמים׃"
  assert strip_hebrew_marks("על־פני ׀ x") == "על־פני ׀ x"  # maqaf and paseq stay
