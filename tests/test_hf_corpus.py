"""Corpora from Hugging Face `datasets`: saved with save_to_disk, read lazily; Hub names offline."""

import json
import shutil
import socket
import subprocess
import sys
import tracemalloc

import datasets
import numpy as np
import pytest

from conftest import REPO, TINY_TEXT, tiny_config
from gpt2jax import train_lib
from gpt2jax import tokenizer as tokenizer_lib
from gpt2jax.data import hf_source, pieces, sources, tokens
from gpt2jax.data.pipeline import prepare_data
from gpt2jax.errors import UserError
from gpt2jax.metrics import read_metrics

STORIES = ["שלום, עולם!\nסיפור ראשון.", None, "Once upon a time,\nthe second story.", "",
           "third 🙂 story"]
TITLES = ["one", "two", "three", "four", "five"]


def _save(dataset, path):
  dataset.save_to_disk(str(path))
  return path


def _hf_config(path, **overrides):
  return tiny_config(data__corpus="hf", data__hf_path=str(path), **overrides)


@pytest.fixture
def saved_dict(tmp_path):
  """A DatasetDict with three splits whose rows say where they come from."""
  splits = {name: datasets.Dataset.from_dict({"body": [f"{name} {i}" for i in range(3)],
                                              "n": [0, 1, 2]})
            for name in ("train", "validation", "test")}
  return _save(datasets.DatasetDict(splits), tmp_path / "dict")


def test_rows_of_a_saved_dataset_are_documents_in_order(tmp_path):
  rows = datasets.Dataset.from_dict({"title": TITLES, "story": STORIES})
  config = _hf_config(_save(rows, tmp_path / "plain"), data__hf_text_field="story")
  expected = [s for s in STORIES if s]  # None and "" rows are skipped
  assert sources.load_documents(config.data) == expected
  config.data.hf_text_field = "title"
  assert sources.load_documents(config.data) == TITLES
  # A format saved with the dataset (numpy arrays here) does not change the documents.
  config = _hf_config(_save(rows.with_format("numpy"), tmp_path / "numpy"),
                      data__hf_text_field="story")
  assert sources.load_documents(config.data) == expected


def test_splits_of_a_dataset_dict_are_chosen_and_joined_with_plus(saved_dict):
  config = _hf_config(saved_dict, data__hf_text_field="body")
  assert sources.load_documents(config.data) == ["train 0", "train 1", "train 2"]
  config.data.hf_split = "test+train"
  assert sources.load_documents(config.data) == [
      "test 0", "test 1", "test 2", "train 0", "train 1", "train 2"]


def test_a_single_dataset_is_read_whole_with_one_note(tmp_path, capsys):
  rows = datasets.Dataset.from_dict({"text": TINY_TEXT.split("\n\n")})
  config = _hf_config(_save(rows, tmp_path / "plain"), data__hf_split="validation")
  assert sources.load_documents(config.data) == TINY_TEXT.split("\n\n")
  prepare_data(config, tmp_path / "run", reuse_tokenizer=False)
  assert capsys.readouterr().err.count(
      "holds one dataset, not a DatasetDict: reading all of it; "
      "data.hf_split='validation' does not apply") == 1
  config.data.hf_split = "train"  # the default: nothing to say
  assert sources.source_note(config.data) is None


def test_mistakes_get_messages_that_name_the_fix(tmp_path, saved_dict):
  def fails(match, **data):
    config = tiny_config(data__corpus="hf", **{f"data__{k}": v for k, v in data.items()})
    with pytest.raises(UserError, match=match):
      sources.load_documents(config.data)

  fails(r"data.hf_path is empty: pass --config.data.hf_path=DIR", hf_path="")
  fails(r"'\./missing' does not exist: pass a directory written by `Dataset.save_to_disk`",
        hf_path="./missing")
  (tmp_path / "texts").mkdir()
  (tmp_path / "texts" / "a.txt").write_text("not a dataset", encoding="utf-8")
  fails(r"is not a dataset saved with `save_to_disk`", hf_path=str(tmp_path / "texts"))
  fails(r"'validation\+dev': 'dev' is not a split of .* \(it has \['train', 'validation', "
        r"'test'\]; '\+' joins splits\)", hf_path=str(saved_dict), hf_split="validation+dev")
  fails(r"hf_text_field='text' is not a column of .*split 'train' \(its columns: "
        r"\['body', 'n'\]\): set --config.data.hf_text_field", hf_path=str(saved_dict))
  fails(r"hf_text_field='n' .* holds Value\('int64'\), not text: set "
        r"--config.data.hf_text_field to a string column \(it has \['body'\]\)",
        hf_path=str(saved_dict), hf_text_field="n")
  lists = datasets.Dataset.from_dict({"lines": [["a", "b"]], "text": ["ab"]})
  fails(r"holds List\(Value\('string'\)\), not text",
        hf_path=str(_save(lists, tmp_path / "lists")), hf_text_field="lines")


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]  # closed on leaving: connecting is refused at once


def _never_load_dataset(*args, **kwargs):
  raise AssertionError("the Hub was asked although it cannot be reached")


def test_hub_name_unreachable_fails_at_once_naming_save_to_disk(monkeypatch):
  """The real probe, pointed at a closed local port: no network needed, nothing retried."""
  monkeypatch.setattr(datasets.config, "HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
  for proxy in ("https_proxy", "HTTPS_PROXY"):
    monkeypatch.delenv(proxy, raising=False)
  monkeypatch.setattr(datasets, "load_dataset", _never_load_dataset)
  config = tiny_config(data__corpus="hf", data__hf_path="someone/stories")
  with pytest.raises(UserError, match=(
      r"'someone/stories' is not a local directory, and the Hugging Face Hub .* cannot be "
      r"reached from this machine: on a machine with internet, run "
      r"`datasets.load_dataset\('someone/stories'\).save_to_disk\('DIR'\)`, copy DIR here and "
      r"pass --config.data.hf_path=DIR\.")):
    sources.load_documents(config.data)


def test_hub_name_in_offline_mode_fails_with_the_same_advice(monkeypatch):
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 sets it
  monkeypatch.setattr(hf_source, "_hub_reachable", _never_load_dataset)
  config = tiny_config(data__corpus="hf", data__hf_path="gpt2jax-tests/no-such-dataset")
  with pytest.raises(UserError, match=r"cannot be reached from this machine \(HF_HUB_OFFLINE "
                                      r"is set\): on a machine with internet, run .*save_to_disk"):
    sources.load_documents(config.data)


def test_rows_are_read_a_batch_at_a_time_from_the_memory_mapped_files(tmp_path, monkeypatch):
  """16 MB of text read with at most a few rows in Python and no Arrow copy in memory."""
  import pyarrow

  row_chars, num_rows = 64 << 10, 256
  rows = [chr(ord("a") + i % 26) * row_chars for i in range(num_rows)]
  path = _save(datasets.Dataset.from_dict({"text": rows, "n": range(num_rows)}), tmp_path / "big")
  del rows
  monkeypatch.setattr(hf_source, "READ_BATCH", 4)
  config = _hf_config(path)
  arrow_before = pyarrow.total_allocated_bytes()
  tracemalloc.start()
  try:
    docs = sources.iter_documents(config.data)
    first = next(docs)
    first_peak = tracemalloc.get_traced_memory()[1]
    arrow_held = pyarrow.total_allocated_bytes() - arrow_before  # while the reader is open
    count = 1 + sum(1 for _ in docs)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert first == "a" * row_chars and count == num_rows
  bound = 32 * row_chars  # 2 MB, for 16 MB of text
  assert first_peak < bound and peak < bound, (first_peak, peak)
  assert arrow_held < bound, arrow_held


def test_hf_corpus_encodes_like_the_same_text_from_a_file(tmp_path):
  paragraphs = TINY_TEXT.split("\n\n")
  (tmp_path / "tiny.txt").write_text(TINY_TEXT, encoding="utf-8")
  path = _save(datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": paragraphs})}),
               tmp_path / "saved")
  from_hf = prepare_data(_hf_config(path), tmp_path / "a", reuse_tokenizer=False)
  from_file = prepare_data(tiny_config(tmp_path / "tiny.txt"), tmp_path / "b",
                           reuse_tokenizer=False)
  assert from_hf.num_documents == len(paragraphs)
  np.testing.assert_array_equal(from_hf.train.tokens, from_file.train.tokens)
  np.testing.assert_array_equal(from_hf.val.tokens, from_file.val.tokens)

  # The hf keys are part of the token cache's key: the same rows from another copy re-encode.
  fingerprint = lambda: json.loads((tmp_path / "a" / "data" / "tokens.json").read_text())[
      "fingerprint"]
  before = fingerprint()
  shutil.copytree(path, tmp_path / "copy")
  prepare_data(_hf_config(tmp_path / "copy"), tmp_path / "a", reuse_tokenizer=True)
  assert fingerprint() != before


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_long_rows_are_encoded_in_bounded_pieces_with_the_ids_of_whole_rows(
    tmp_path, monkeypatch, kind):
  """A row is one document held whole, but every pass after reading it works on pieces: the
  tokenizer never sees more than a piece, and the ids are those of each whole row."""
  rows = [TINY_TEXT, TINY_TEXT.upper().replace("\n\n", "\n")]
  path = _save(datasets.Dataset.from_dict({"text": rows}), tmp_path / "long_rows")
  monkeypatch.setattr(pieces, "PIECE_CHARS", 400)
  cls, method = ((tokenizer_lib.CharTokenizer, "encode_array") if kind == "char" else
                 (tokenizer_lib.SentencePieceTokenizer, "encode_batch"))
  real, longest = getattr(cls, method), []

  def spy(self, texts):
    longest.append(max(map(len, [texts] if isinstance(texts, str) else texts), default=0))
    return real(self, texts)

  monkeypatch.setattr(cls, method, spy)
  config = _hf_config(path, tokenizer__kind=kind, tokenizer__vocab_size=400)
  data = prepare_data(config, tmp_path / "run", reuse_tokenizer=False)
  monkeypatch.setattr(cls, method, real)
  assert data.num_documents == 2 and 0 < max(longest) <= 400
  train_chars = tokens.plan_split([len(r) for r in rows], config.data.val_fraction,
                                  config.data.shuffle_documents)
  eos = [data.tokenizer.eos_id]
  expected = {"train": [], "val": []}
  for train_part, val_part in tokens.split_parts(rows, train_chars):
    for name, part in (("train", train_part), ("val", val_part)):
      if part:
        expected[name] += data.tokenizer.encode(part) + eos
  assert data.train.tokens.tolist() == expected["train"]
  assert data.val.tokens.tolist() == expected["val"]


def test_tiny_run_on_a_saved_dataset_learns_and_caches_its_tokens(tmp_path):
  rows = datasets.Dataset.from_dict({"story": TINY_TEXT.split("\n\n")})
  path = _save(datasets.DatasetDict({"train": rows}), tmp_path / "saved")
  config = _hf_config(path, data__hf_text_field="story", train__num_steps=20,
                      train__eval_every=10, train__checkpoint_every=20)
  train_lib.train_and_evaluate(config, tmp_path / "run")
  val = [r["val_loss"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
  assert len(val) == 3 and val[-1] < val[0] - 0.5, val
  meta = json.loads((tmp_path / "run" / "data" / "tokens.json").read_text())
  assert meta["splits"]["train"]["num_tokens"] > 0
  assert (tmp_path / "run" / "data" / "train.bin").stat().st_size > 0


@pytest.mark.slow
def test_datasets_is_imported_only_for_an_hf_corpus(tiny_text_file):
  """`import datasets` takes seconds: training on text files must not pay for it."""
  code = f"""if True:
    import sys
    from configs import default
    from gpt2jax import train_lib
    from gpt2jax.data import sources
    config = default.get_config()
    config.data.path = {str(tiny_text_file)!r}
    assert sources.load_documents(config.data)
    assert "datasets" not in sys.modules, "imported datasets"
    """
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
