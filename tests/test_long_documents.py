"""Memory bounded by a piece, not by a document: long documents are read, measured, sampled,
split and encoded in pieces, and the pieces give the ids the whole document would."""

import json
import random
import unicodedata

import numpy as np
import pytest

from conftest import REPO, tiny_config
from gpt2jax import hf_tokenizer
from gpt2jax import tokenizer as tokenizer_lib
from gpt2jax.data import pieces, sources, tokens
from gpt2jax.data.normalize import normalize_text
from gpt2jax.data.pieces import Piece, cut_changes_ids, document_pieces, join_documents
from gpt2jax.data.pipeline import prepare_data
from gpt2jax.tokenizer import CharTokenizer, SentencePieceTokenizer, sample_lines

TINY_GPT2 = REPO / "tests" / "fixtures" / "hf_gpt2_tiny"
WORDS = ("In the beginning God created the heaven and the earth , don't it's “quoted” (paren) "
         "3.14 2026 ünïcödé 😀 ▁meta בראשית ברא אלהים את השמים ואת הארץ׃ וידבר יהוה "
         "אל־משה לאמר, שָׁלוֹם").split()
GAPS = (" ", " ", " ", " ", "  ", "   ", "\n", "\n\n", " \n", "\n ", "\t", " \t ")


def long_document(num_words: int, gaps=GAPS, seed: int = 0) -> str:
  """Hebrew and English words between runs of spaces, tabs and newlines."""
  rng = random.Random(seed)
  return normalize_text("".join(rng.choice(WORDS) + rng.choice(gaps) for _ in range(num_words)))


DOCUMENT = long_document(3000)


@pytest.fixture(scope="module")
def tokenizers():
  return {
      "char": CharTokenizer.train([DOCUMENT, long_document(500, ("-", "."))]),
      "bpe": SentencePieceTokenizer.train([DOCUMENT], vocab_size=500),
      "hf": hf_tokenizer.HFTokenizer.from_path(TINY_GPT2),  # GPT-2's byte-level BPE
  }


def ids_in_pieces(tokenizer, piece_list):
  return [i for piece in piece_list for i in tokenizer.encode(piece.text)]


@pytest.mark.parametrize("kind", ["char", "bpe", "hf"])
@pytest.mark.parametrize("gaps", [GAPS, ("\n", "\t\n", "\n\n")], ids=["spaces", "newlines"])
def test_a_long_document_encoded_in_pieces_gets_the_ids_of_the_whole(tokenizers, kind, gaps):
  """Cuts before a space (or, without one, a newline) after a non-space keep every id."""
  tokenizer = tokenizers[kind]
  doc = DOCUMENT if gaps is GAPS else long_document(3000, gaps)
  piece_list = list(document_pieces(doc, limit=300))
  assert len(piece_list) > 50 and max(len(p.text) for p in piece_list) <= 300
  assert "".join(p.text for p in piece_list) == doc
  assert [p.ends_document for p in piece_list] == [False] * (len(piece_list) - 1) + [True]
  assert ids_in_pieces(tokenizer, piece_list) == tokenizer.encode(doc)
  assert not any(cut_changes_ids(tokenizer, a.text, b.text)
                 for a, b in zip(piece_list, piece_list[1:]))


@pytest.mark.parametrize("kind", ["char", "bpe", "hf"])
def test_without_spaces_or_newlines_cuts_are_exact_for_char_and_checked_for_others(
    tokenizers, kind):
  """The documented exception: a long run without whitespace is cut inside it, where subword
  ids can differ; every such difference is caught by the check the encoder reports."""
  tokenizer = tokenizers[kind]
  doc = long_document(2000, ("-", "."))
  piece_list = list(document_pieces(doc, limit=300))
  assert len(piece_list) > 20 and "".join(p.text for p in piece_list) == doc
  changed = [cut_changes_ids(tokenizer, a.text, b.text)
             for a, b in zip(piece_list, piece_list[1:])]
  if kind == "char":
    assert not any(changed)
  if ids_in_pieces(tokenizer, piece_list) != tokenizer.encode(doc):
    assert any(changed)


def test_cuts_keep_nfc_and_never_separate_combining_marks():
  doc = "".join(random.Random(1).choice(["e\u0301", "שָׁ", "ו\u05bc", "x", "\u05b0\u05b8"])
                for _ in range(5000))  # no spaces or newlines: the last-resort cut
  piece_list = list(document_pieces(doc, limit=100))
  assert len(piece_list) > 50
  assert "".join(normalize_text(p.text) for p in piece_list) == normalize_text(doc)
  assert not any(unicodedata.combining(p.text[0]) for p in piece_list)


class _Chunks:
  """A file's chunks, counting how many were read."""

  def __init__(self, text: str, size: int):
    self.text, self.size, self.read = text, size, 0

  def __iter__(self):
    for start in range(0, len(self.text), self.size):
      self.read += 1
      yield self.text[start:start + self.size]


@pytest.mark.parametrize("separator", ["\n\n", "<|endoftext|>", ""])
def test_the_reader_gives_out_bounded_pieces_before_a_document_ends(separator):
  text = long_document(3000, (" ", "\n")) + "<|endoftext|>" + long_document(50)
  chunks = _Chunks(text, 100)
  stream = sources.split_stream(chunks, separator, limit=64)
  first = next(stream)
  assert chunks.read <= 2 and len(first.text) <= 64  # not the whole (one-document) file first
  piece_list = [first, *stream]
  assert max(len(p.text) for p in piece_list) <= 64
  assert list(join_documents(piece_list)) == (text.split(separator) if separator else [text])


def test_measuring_and_splitting_pieces_equals_whole_documents():
  docs = [long_document(n, seed=n) for n in (1, 40, 900, 7, 300)]
  piece_list = [p for doc in docs for p in document_pieces(doc, limit=50)]
  whole, pieced = tokens.scan_corpus(docs), tokens.scan_corpus(piece_list)
  assert (pieced.lengths, pieced.digest) == (whole.lengths, whole.digest)
  for val_fraction in (0.1, 0.5, 0.93):
    train_chars = tokens.plan_split(whole.lengths, val_fraction, shuffle=True)
    split = {"train": [], "val": []}
    for name, piece in tokens.split_pieces(piece_list, train_chars):
      split[name].append(piece)
    parts = list(tokens.split_parts(docs, train_chars))
    assert list(join_documents(split["train"])) == [t for t, _ in parts if t]
    assert list(join_documents(split["val"])) == [v for _, v in parts if v]


@pytest.mark.parametrize("kind", ["char", "bpe", "hf"])
def test_preparing_a_one_document_file_never_encodes_the_document_whole(
    tmp_path, monkeypatch, kind):
  """The token cache of a file without the separator equals whole-document encoding, while
  the tokenizer never sees more than a piece at once."""
  path = tmp_path / "one_document.txt"
  path.write_text(DOCUMENT, encoding="utf-8")
  monkeypatch.setattr(pieces, "PIECE_CHARS", 400)
  monkeypatch.setattr(sources, "READ_CHUNK_BYTES", 1000)
  longest = []
  classes = {"char": (CharTokenizer, "encode_array"), "bpe": (SentencePieceTokenizer, "encode_batch"),
             "hf": (hf_tokenizer.HFTokenizer, "encode_batch")}
  cls, method = classes[kind]
  real = getattr(cls, method)

  def spy(self, texts):
    longest.append(max(map(len, [texts] if isinstance(texts, str) else texts), default=0))
    return real(self, texts)

  monkeypatch.setattr(cls, method, spy)
  config = tiny_config(path, data__separator="<|endoftext|>", tokenizer__kind=kind,
                       tokenizer__vocab_size=500, tokenizer__path=str(TINY_GPT2))
  data = prepare_data(config, tmp_path / "run", reuse_tokenizer=False)
  assert data.num_documents == 1 and max(longest) <= 400
  cut = int(tokens.plan_split([len(DOCUMENT)], config.data.val_fraction, True)[0])
  eos = [data.tokenizer.eos_id]
  monkeypatch.setattr(cls, method, real)
  assert data.train.tokens.tolist() == data.tokenizer.encode(DOCUMENT[:cut]) + eos
  assert data.val.tokens.tolist() == data.tokenizer.encode(DOCUMENT[cut:]) + eos
  meta = json.loads((tmp_path / "run" / "data" / "tokens.json").read_text())
  assert meta["splits"]["train"]["cuts"] > 10
  assert meta["splits"]["train"]["cuts_that_change_ids"] == 0


def test_an_hf_tokenizer_is_given_a_bounded_batch_of_text_per_call(tokenizers, monkeypatch):
  """`tokenizers` keeps every token's offsets and strings until a call returns: encode_batch
  hands it at most ENCODE_BATCH_CHARS at a time, with the same ids."""
  tokenizer = tokenizers["hf"]
  texts = [p.text for p in document_pieces(DOCUMENT, limit=300)]
  whole = [tokenizer.encode(t) for t in texts]
  monkeypatch.setattr(hf_tokenizer, "ENCODE_BATCH_CHARS", 1000)
  real, per_call = tokenizer._tok, []

  class Spy:
    def encode_batch(self, batch, **kwargs):
      per_call.append(sum(map(len, batch)))
      return real.encode_batch(batch, **kwargs)

  monkeypatch.setattr(tokenizer, "_tok", Spy())
  assert tokenizer.encode_batch(texts) == whole
  assert max(per_call) <= 1000 and len(per_call) >= len(DOCUMENT) // 1000


def test_cuts_that_change_ids_are_counted_and_reported(tmp_path, monkeypatch, capsys):
  """A tokenizer.json that changes the start of every text (Llama 2's Prepend) cannot be
  encoded in pieces exactly: the note says so."""
  data = json.loads((TINY_GPT2 / "tokenizer.json").read_text(encoding="utf-8"))
  data["normalizer"] = {"type": "Prepend", "prepend": "_"}
  (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
  path = tmp_path / "one_document.txt"
  path.write_text(DOCUMENT, encoding="utf-8")
  monkeypatch.setattr(pieces, "PIECE_CHARS", 400)
  config = tiny_config(path, data__separator="", tokenizer__kind="hf",
                       tokenizer__path=str(tmp_path))
  prepare_data(config, tmp_path / "run", reuse_tokenizer=False)
  meta = json.loads((tmp_path / "run" / "data" / "tokens.json").read_text())
  train = meta["splits"]["train"]
  assert train["cuts"] > 10 and train["cuts_that_change_ids"] == train["cuts"]
  assert "other ids than it would for the whole document" in capsys.readouterr().err


def test_a_large_file_without_the_separator_gets_one_note(tmp_path, monkeypatch, capsys):
  path = tmp_path / "stories.txt"
  path.write_text(DOCUMENT, encoding="utf-8")  # has blank lines, no <|endoftext|>
  monkeypatch.setattr(sources, "SEPARATOR_NOTE_CHARS", 10_000)
  monkeypatch.setattr(sources, "_separator_noted", set())
  config = tiny_config(path, data__separator="<|endoftext|>", tokenizer__kind="bpe",
                       tokenizer__vocab_size=500)
  data = prepare_data(config, tmp_path / "run", reuse_tokenizer=False)  # reads it 3 times
  err = capsys.readouterr().err
  assert data.num_documents == 1 and err.count("note: data.separator='<|endoftext|>' never "
                                               "occurs in") == 1
  assert "--config.data.separator=$'\\n\\n' makes each paragraph a document" in err
  for separator in ("\n\n", ""):  # found, or files kept whole on purpose: no note
    config.data.separator = separator
    prepare_data(config, tmp_path / f"run{len(separator)}", reuse_tokenizer=False)
    assert "never occurs" not in capsys.readouterr().err


def test_the_tokenizer_sample_is_bounded_and_representative_of_every_corpus_shape():
  giant_line = long_document(40_000, (" ",))  # ~300k characters, no newline
  short_lines = [f"short line {i} שלום" for i in range(15_000)]  # ~300k characters
  corpus = [Piece(p.text, False) for p in document_pieces(giant_line, limit=1000)]
  corpus += [Piece("\n".join(short_lines), True)]
  sample = sample_lines(corpus, size=100_000, seed=0, max_chars=100_000)
  assert sum(map(len, sample)) <= 100_000
  assert max(map(len, sample)) <= tokenizer_lib.SAMPLE_LINE_CHARS
  from_giant = sum(len(s) for s in sample if not s.startswith("short line"))
  assert 0.3 < from_giant / sum(map(len, sample)) < 0.7  # half of the corpus, half the sample
  assert sample == sample_lines(corpus, size=100_000, seed=0, max_chars=100_000)
  # Counted in lines, a corpus of short lines is sampled uniformly, in corpus order.
  lines = sample_lines([Piece("\n".join(short_lines), True)], size=500, seed=0)
  assert len(lines) == 500 and lines == sorted(lines, key=short_lines.index)
