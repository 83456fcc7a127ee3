"""From config to ready token splits: corpus -> split -> tokenizer (trained once) -> cache."""

from __future__ import annotations

import dataclasses
import itertools
import sys
from pathlib import Path

import numpy as np

from gpt2jax import tokenizer as tokenizer_lib
from gpt2jax.data import sources, tokens
from gpt2jax.workdir import DATA_DIR, TOKENIZER_DIR


@dataclasses.dataclass
class PreparedData:
  tokenizer: tokenizer_lib.Tokenizer
  train: tokens.Split
  val: tokens.Split
  num_documents: int
  num_characters: int
  trained_tokenizer: bool  # False when the workdir's saved tokenizer was reused


def _split_settings(data_config) -> dict:
  """The config values that change which text ends up in which split."""
  return {k: data_config[k] for k in
          ("corpus", "path", "separator", "keep_niqqud", "val_fraction", "shuffle_documents",
           "tfds", "tfds_split", "tfds_text_field", "hf_path", "hf_split", "hf_text_field")}


def prepare_data(config, workdir: Path, *, reuse_tokenizer: bool) -> PreparedData:
  """Reads the corpus and returns encoded splits (from the workdir's cache when it matches).

  reuse_tokenizer: load the workdir's tokenizer (a resumed run must keep its vocabulary)
  instead of training one on the corpus.

  The corpus is streamed in pieces of documents (data/pieces.py), never held in memory: once
  to measure it (and collect a char vocabulary's characters), once for a BPE tokenizer's
  (bounded) training sample, once to encode it when the token cache does not match.
  """
  def read():
    return sources.iter_pieces(config.data)

  if note := sources.source_note(config.data):
    print(note, file=sys.stderr)
  trained = not reuse_tokenizer
  char_vocabulary = trained and config.tokenizer.kind == "char"
  scan = tokens.scan_corpus(read(), collect_characters=char_vocabulary)
  if not scan.num_documents:
    raise sources.empty_corpus_error(config.data)
  train_chars = tokens.plan_split(scan.lengths, config.data.val_fraction,
                                  config.data.shuffle_documents)
  tokenizer_dir = Path(workdir) / TOKENIZER_DIR
  if trained:
    # A char vocabulary is just the set of characters, taken from all text so that validation
    # never meets an unknown one; BPE merges are learned from the training split only.
    if char_vocabulary:
      text = ["".join(sorted(scan.characters))]
    else:
      text = (piece for split, piece in tokens.split_pieces(read(), train_chars)
              if split == "train")
    tokenizer = tokenizer_lib.train_tokenizer(config.tokenizer, text, seed=config.seed)
    if tokenizer.kind == "hf":
      _note_inexact_round_trip(tokenizer, (piece.text for piece in read()))
    tokenizer.save(tokenizer_dir)
  else:
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir)
  train, val = tokens.cached_splits(Path(workdir) / DATA_DIR, tokenizer, read, scan,
                                    train_chars, _split_settings(config.data))
  return PreparedData(tokenizer, train, val, scan.num_documents, scan.num_characters, trained)


def _note_inexact_round_trip(tokenizer, texts, how_many: int = 200,
                             characters: int = 1 << 20) -> None:
  """A tokenizer.json may not give back the text it encodes (lower-casing, unknown tokens):
  say so once, with an example from the corpus (its first pieces of text, a bounded amount)."""
  from gpt2jax.hf_tokenizer import round_trip_failure

  def first():
    seen = 0
    for text in itertools.islice(texts, how_many):
      if seen >= characters:
        return
      yield text
      seen += len(text)

  failure = round_trip_failure(tokenizer, first())
  if failure is not None:
    decoded = tokenizer.decode(tokenizer.encode(failure))
    print(f"note: this tokenizer does not give its text back exactly (e.g. {failure[:40]!r} "
          f"decodes to {decoded[:40]!r}): samples will differ from the corpus in such places.",
          file=sys.stderr)


def prepare_data_on_every_process(config, workdir: Path, resuming: bool) -> PreparedData:
  """Process 0 prepares the data first; the others then reuse its tokenizer and token cache
  when the workdir is shared, or prepare their own copy, which must come out the same."""
  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return prepare_data(config, workdir, reuse_tokenizer=resuming)
  if jax.process_index() == 0:
    data = prepare_data(config, workdir, reuse_tokenizer=resuming)
  multihost_utils.sync_global_devices("gpt2jax: data prepared on process 0")
  if jax.process_index() != 0:
    shared = (Path(workdir) / TOKENIZER_DIR / tokenizer_lib.TOKENIZER_JSON).exists()
    data = prepare_data(config, workdir, reuse_tokenizer=resuming or shared)
  fingerprint = int(tokenizer_lib.tokenizer_fingerprint(data.tokenizer)[:8], 16)
  multihost_utils.assert_equal(
      np.array([fingerprint, len(data.train.tokens), len(data.val.tokens)], np.int64),
      "The processes prepared different data (tokenizer or token counts differ): give every "
      "host the same corpus, or put the workdir on storage all hosts share.")
  return data
