import numpy as np
import pytest

from conftest import tiny_config
from gpt2jax.data import batches, sources, tokens
from gpt2jax.data.pipeline import prepare_data
from gpt2jax.errors import UserError
from gpt2jax.tokenizer import CharTokenizer


def test_split_is_deterministic_and_takes_the_requested_fraction():
  docs = [f"document {i} " * (i % 13 + 1) for i in range(200)]
  train, val = tokens.split_documents(docs, 0.1, shuffle=True)
  assert (train, val) == tokens.split_documents(docs, 0.1, shuffle=True)
  total = sum(map(len, docs))
  assert sum(map(len, val)) == round(total * 0.1)
  assert sum(map(len, train + val)) == total  # nothing lost; one document may be cut in two
  assert len(train) + len(val) in (len(docs), len(docs) + 1)


def test_single_document_split_is_first_90_last_10_percent():
  text = "".join(chr(ord("a") + i % 26) for i in range(1000))
  train, val = tokens.split_documents([text], 0.1, shuffle=True)
  assert train == [text[:900]] and val == [text[900:]]


def test_encoded_documents_end_with_eos():
  tokenizer = CharTokenizer.train(["ab", "c"])
  ids = tokens.encode_documents(tokenizer, ["ab", "c"])
  assert ids.dtype == np.uint16
  assert ids.tolist() == [0, 1, tokenizer.eos_id, 2, tokenizer.eos_id]


def test_train_batches_are_a_pure_function_of_seed_and_step():
  data = np.arange(1000, dtype=np.uint16)
  a = batches.TrainBatches(data, block_size=16, batch_size=8, seed=3)
  b = batches.TrainBatches(data, block_size=16, batch_size=8, seed=3)
  for step in (0, 5, 7, 100):  # b is asked in a different order: no hidden state
    np.testing.assert_array_equal(a.batch(step), b.batch(step))
  np.testing.assert_array_equal(a.batch(7), b.batch(7))
  assert not np.array_equal(a.batch(0), batches.TrainBatches(data, 16, 8, seed=4).batch(0))
  window = a.batch(3)[0]
  np.testing.assert_array_equal(window, np.arange(window[0], window[0] + 17))


def test_an_epoch_visits_every_window_once():
  data = np.arange(16 * 40 + 1, dtype=np.uint16)
  source = batches.TrainBatches(data, block_size=16, batch_size=8, seed=0)
  starts = np.concatenate([source.window_starts(s) for s in range(5)])  # 40 windows
  assert sorted(starts.tolist()) == list(range(0, 16 * 40, 16))


def test_processes_split_the_global_batch():
  data = np.arange(5000, dtype=np.uint16)
  whole = batches.TrainBatches(data, 16, 8, seed=1).batch(9)
  parts = [batches.TrainBatches(data, 16, 8, seed=1, process_index=i, process_count=2).batch(9)
           for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_eval_batches_are_fixed_and_span_the_split():
  data = np.arange(1000, dtype=np.uint16)
  windows = batches.eval_batches(data, block_size=16, batch_size=4, num_batches=3)
  assert len(windows) == 3 and windows[0].shape == (4, 17)
  assert windows[0][0, 0] == 0 and windows[-1][-1, -1] == 999


def test_a_split_shorter_than_a_block_is_a_clear_error():
  with pytest.raises(UserError, match="validation split has 10 tokens.*block_size"):
    batches.eval_batches(np.arange(10), block_size=16, batch_size=2, num_batches=1)


def test_token_cache_is_reused_until_corpus_or_tokenizer_change(tmp_path, tiny_text_file):
  config = tiny_config(tiny_text_file)
  first = prepare_data(config, tmp_path, reuse_tokenizer=False)
  bin_file = tmp_path / "data" / "train.bin"
  stamp = bin_file.stat().st_mtime_ns
  again = prepare_data(config, tmp_path, reuse_tokenizer=True)
  assert bin_file.stat().st_mtime_ns == stamp
  np.testing.assert_array_equal(again.train.tokens, first.train.tokens)
  assert first.val.num_bytes > 0 and first.val.bytes_per_token > 1.0  # Hebrew is 2 bytes/char

  config.data.val_fraction = 0.2
  changed = prepare_data(config, tmp_path, reuse_tokenizer=True)
  assert len(changed.val.tokens) > len(first.val.tokens)


@pytest.mark.parametrize("kind, passes", [("char", 2), ("bpe", 3)])
def test_the_corpus_is_read_once_per_pass_it_needs(tmp_path, tiny_text_file, monkeypatch,
                                                    kind, passes):
  """Measure (+ a char vocabulary's characters), [BPE sample], encode; a reused tokenizer and
  token cache need only the measuring pass."""
  config = tiny_config(tiny_text_file)
  config.tokenizer.kind = kind
  config.tokenizer.vocab_size = 340
  reads = []
  real = sources.iter_pieces
  monkeypatch.setattr(sources, "iter_pieces", lambda c: reads.append(1) or real(c))
  first = prepare_data(config, tmp_path, reuse_tokenizer=False)
  assert len(reads) == passes
  reads.clear()
  again = prepare_data(config, tmp_path, reuse_tokenizer=True)
  assert len(reads) == 1
  np.testing.assert_array_equal(again.train.tokens, first.train.tokens)
  if kind == "char":  # every character of both splits, and nothing else
    text = "".join(piece.text for piece in real(config.data))
    assert first.tokenizer.chars == "".join(sorted(set(text)))


def test_text_corpus_splits_files_into_documents(tmp_path):
  (tmp_path / "a.txt").write_text("one\n\ntwo", encoding="utf-8")
  (tmp_path / "b.txt").write_text("three", encoding="utf-8")
  config = tiny_config(tmp_path)
  assert sources.load_documents(config.data) == ["one", "two", "three"]
  config.data.separator = ""
  assert sources.load_documents(config.data) == ["one\n\ntwo", "three"]
  config.data.path = str(tmp_path / "*.txt")
  assert len(sources.load_documents(config.data)) == 2


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"caf\xe9 latin-1", "not UTF-8 text.*line 1"),
])
def test_bad_text_corpus_is_a_clear_error(tmp_path, content, message):
  path = tmp_path / "bad.txt"
  path.write_bytes(content)
  with pytest.raises(UserError, match=message):
    sources.load_documents(tiny_config(path).data)


def test_missing_corpus_path_is_a_clear_error(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    sources.load_documents(tiny_config(tmp_path / "nope.txt").data)


def test_packaged_hebrew_corpus_has_no_niqqud_by_default():
  config = tiny_config()
  config.data.corpus = "hebrew"
  docs = sources.load_documents(config.data)
  assert docs[0].startswith("בראשית ברא אלהים את השמים ואת הארץ׃\n")
  assert len(docs) > 1000 and not any("<" in d for d in docs)
  config.data.keep_niqqud = True
  assert "\u05b0" <= sources.load_documents(config.data)[0][1] <= "\u05c7"


def test_packaged_english_corpus_is_the_king_james_bible():
  config = tiny_config()
  config.data.corpus = "english"
  docs = sources.load_documents(config.data)
  assert docs[0].startswith("In the beginning God created the heaven and the earth.")
  assert sum(map(len, docs)) > 4_000_000
