"""Corpora at scale: TFDS datasets read as array_record, and streamed tokenization."""

import importlib
import sys

import numpy as np
import pytest

from conftest import TINY_TEXT, tiny_config
from gpt2jax.data import sources, tfds_source, tokens
from gpt2jax.data.pieces import join_documents
from gpt2jax.data.pipeline import prepare_data
from gpt2jax.errors import UserError
from gpt2jax.tokenizer import sample_lines

LOCAL_BUILDER = '''
import tensorflow_datasets as tfds


class LocalLetters(tfds.core.GeneratorBasedBuilder):
  """One example per .txt file of the manual directory."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put .txt files in the manual directory."

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"body": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(sorted(dl_manager.manual_dir.glob("*.txt")))}

  def _generate_examples(self, paths):
    for path in paths:
      yield path.name, {"body": path.read_text(encoding="utf-8")}
'''

LETTERS = ["שלום, עולם!\nמכתב ראשון.", "Dear world,\nthe second letter.", "third 🙂 letter"]


@pytest.fixture
def local_tfds(tmp_path, monkeypatch):
  """A TFDS dataset 'local_letters' built from files this test writes, offline."""
  package = tmp_path / "builders" / "local_letters_tfds"  # TFDS wants builders in packages
  package.mkdir(parents=True)
  (package / "__init__.py").write_text(LOCAL_BUILDER, encoding="utf-8")
  monkeypatch.syspath_prepend(str(package.parent))
  if "local_letters_tfds" not in sys.modules:
    importlib.import_module("local_letters_tfds")  # registers the builder by its name
  manual = tmp_path / "manual"
  manual.mkdir()
  for i, text in enumerate(LETTERS):
    (manual / f"{i}.txt").write_text(text, encoding="utf-8")
  return tmp_path


def _tfds_config(root, **overrides):
  config = tiny_config(**overrides)
  config.data.corpus = "tfds"
  config.data.tfds = "local_letters"
  config.data.tfds_text_field = "body"
  config.data.tfds_data_dir = str(root / "tfds")
  config.data.tfds_manual_dir = str(root / "manual")
  return config


def test_tfds_dataset_is_prepared_from_the_manual_dir_and_read_as_array_record(local_tfds):
  config = _tfds_config(local_tfds)
  assert sources.load_documents(config.data) == LETTERS
  assert list((local_tfds / "tfds" / "local_letters" / "1.0.0").glob("*.array_record*"))
  assert sources.load_documents(config.data) == LETTERS  # read again, already prepared

  config.data.tfds_text_field = "text"
  with pytest.raises(UserError, match=r"no field 'text'.*\['body'\]"):
    sources.load_documents(config.data)
  config.data.tfds_text_field, config.data.tfds_split = "body", "validation"
  with pytest.raises(UserError, match="tfds_split='validation' is not a split"):
    sources.load_documents(config.data)


def test_tfds_corpus_trains_like_the_same_text_from_files(local_tfds, tmp_path):
  from_tfds = prepare_data(_tfds_config(local_tfds), tmp_path / "a", reuse_tokenizer=False)
  config = tiny_config(local_tfds / "manual", data__separator="")
  from_files = prepare_data(config, tmp_path / "b", reuse_tokenizer=False)
  assert from_tfds.num_documents == 3
  np.testing.assert_array_equal(from_tfds.train.tokens, from_files.train.tokens)
  np.testing.assert_array_equal(from_tfds.val.tokens, from_files.val.tokens)


def test_offline_tfds_fails_fast_and_names_data_path(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_source, "_online", lambda timeout=3.0: False)
  config = tiny_config()
  config.data.corpus, config.data.tfds = "tfds", "tiny_shakespeare"
  config.data.tfds_data_dir = str(tmp_path / "tfds")
  with pytest.raises(UserError, match=r"offline.*--config\.data\.path=FILE"):
    sources.load_documents(config.data)


def test_data_path_overrides_a_tfds_default(tiny_text_file, tmp_path, capsys):
  config = tiny_config(tiny_text_file)
  config.data.corpus, config.data.tfds = "tfds", "tiny_shakespeare"
  assert sources.load_documents(config.data) == sources.load_documents(
      tiny_config(tiny_text_file).data)
  prepare_data(config, tmp_path, reuse_tokenizer=False)
  assert capsys.readouterr().err.count("instead of the TFDS dataset 'tiny_shakespeare'") == 1


def test_streamed_encoding_of_a_multi_file_corpus_equals_the_in_memory_result(
    tmp_path, monkeypatch):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  paragraphs = TINY_TEXT.split("\n\n")
  for i in range(5):
    (corpus / f"part{i}.txt").write_text("\n\n".join(paragraphs[i::5]), encoding="utf-8")
  config = tiny_config(corpus, tokenizer__kind="bpe", tokenizer__vocab_size=400)
  # Small chunks everywhere, so that files are read, split and encoded in many pieces.
  monkeypatch.setattr(sources, "READ_CHUNK_BYTES", 100)
  monkeypatch.setattr(tokens, "ENCODE_CHUNK_CHARS", 500)
  encoded_chunks = []
  real_encode = tokens.encode_pieces
  monkeypatch.setattr(tokens, "encode_pieces",
                      lambda tok, pieces: encoded_chunks.append(sum(len(p.text) for p in pieces))
                      or real_encode(tok, pieces))

  data = prepare_data(config, tmp_path / "run", reuse_tokenizer=False)
  chunks = list(encoded_chunks)

  docs = sources.load_documents(config.data)
  assert len(docs) == len(paragraphs)
  train_docs, val_docs = tokens.split_documents(docs, config.data.val_fraction, shuffle=True)
  np.testing.assert_array_equal(data.train.tokens,
                                tokens.encode_documents(data.tokenizer, train_docs))
  np.testing.assert_array_equal(data.val.tokens, tokens.encode_documents(data.tokenizer, val_docs))
  assert isinstance(data.train.tokens, np.memmap)
  assert len(chunks) > 5 and max(chunks) < 500 + max(map(len, docs))


def test_tokenizer_sample_is_bounded_and_reproducible():
  docs = [f"line {i}\nsecond {i}\n" for i in range(1000)]
  sample = sample_lines(iter(docs), 50, seed=3)
  assert len(sample) == 50 and len(set(sample)) == 50
  assert sample == sample_lines(iter(docs), 50, seed=3)
  assert {s.split()[0] for s in sample} == {"line", "second"}
  assert sample_lines(docs[:3], 50, seed=3) == [
      "line 0", "second 0", "line 1", "second 1", "line 2", "second 2"]


def test_text_documents_split_across_read_chunks_like_whole_files(tmp_path, monkeypatch):
  path = tmp_path / "t.txt"
  text = "a\n\nbb\n\n\n\nccc\n\nשלום\n\n"
  path.write_text(text, encoding="utf-8")
  monkeypatch.setattr(sources, "READ_CHUNK_BYTES", 3)  # cuts Hebrew letters and separators
  assert list(join_documents(sources.text_documents(tiny_config(path).data))) == text.split(
      "\n\n")
  path.write_bytes("ok\n".encode() * 5 + b"\xff")
  with pytest.raises(UserError, match="invalid byte 0xff on line 6"):
    list(sources.text_documents(tiny_config(path).data))


@pytest.mark.parametrize("filesystem", ["local", "remote"])
def test_data_path_listing_rules(tmp_path, filesystem):
  """A file, a directory (every *.txt under it) or a glob. gs:// paths follow the same rules
  through epath's own listing, run here on a local directory (its globs take no '**')."""
  from etils import epath

  (tmp_path / "sub").mkdir()
  for name in ("a.txt", "notes.md", "sub/b.txt", "sub/c.txt"):
    (tmp_path / name).write_text("x", encoding="utf-8")
  if filesystem == "local":
    files = sources.text_files
  else:
    files = lambda path: sources._matching_files(path, epath.Path(path), sources._remote_glob)
  names = lambda path: [str(p.relative_to(tmp_path)) for p in files(str(path))]
  assert names(tmp_path) == ["a.txt", "sub/b.txt", "sub/c.txt"]
  assert names(tmp_path / "sub" / "c.txt") == ["sub/c.txt"]
  assert names(tmp_path / "s*" / "[bz].txt") == ["sub/b.txt"]
  if filesystem == "local":
    assert names(tmp_path / "**" / "*.txt") == ["a.txt", "sub/b.txt", "sub/c.txt"]
  with pytest.raises(UserError, match="does not exist"):
    files(str(tmp_path / "missing.txt"))
  with pytest.raises(UserError, match="matches no files"):
    files(str(tmp_path / "*.json"))


def test_cloud_glob_with_double_star_names_the_fix():
  with pytest.raises(UserError, match="cannot use '\\*\\*'; name the directory"):
    sources.text_files("gs://some-bucket/corpus/**/*.txt")


def test_cloud_path_without_its_filesystem_package_names_the_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` now fails, as if not installed
  with pytest.raises(UserError, match="requirements-tpu.txt"):
    sources.text_files("gs://some-bucket/corpus/*.txt")
