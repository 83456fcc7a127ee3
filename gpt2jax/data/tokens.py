"""Train/validation split, encoding to token ids, and the on-disk token cache.

Which documents are held out is decided from their lengths alone: in an order shuffled with a
fixed seed (so validation is a random sample of the corpus and does not depend on
config.seed), the last `val_fraction` of the characters becomes the validation split, and the
document that straddles the cut is cut in two. Each split keeps the corpus order. For a
one-document corpus this is nanoGPT's "first 90% train, last 10% validation".

Each split is stored as one flat array of ids with end-of-text after every document:
`<workdir>/data/{train,val}.bin` plus `tokens.json` (dtype, lengths, byte counts and a
fingerprint of corpus + tokenizer; a changed corpus or tokenizer re-encodes). A corpus is read
as a stream, three times (lengths, tokenizer sample, encoding), and encoded in chunks appended
to the files, so memory stays bounded however large the corpus; the files are memory-mapped.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from gpt2jax import errors
from gpt2jax.tokenizer import Tokenizer, tokenizer_fingerprint
from gpt2jax.workdir import atomic_path, write_atomic

SPLIT_SHUFFLE_SEED = 1234
META_FILE = "tokens.json"
SPLITS = ("train", "val")


@dataclasses.dataclass
class Split:
  tokens: np.ndarray  # [num_tokens] uint16 or uint32 (memory-mapped when cached)
  num_bytes: int  # UTF-8 bytes of the text these tokens encode

  @property
  def bytes_per_token(self) -> float:
    return self.num_bytes / max(len(self.tokens), 1)


@dataclasses.dataclass
class CorpusScan:
  """What one streaming pass over the corpus learns: sizes, and a digest of the content."""

  lengths: array.array  # characters per document, in corpus order
  digest: str
  characters: frozenset[str] | None = None  # every distinct character, when asked for

  @property
  def num_documents(self) -> int:
    return len(self.lengths)

  @property
  def num_characters(self) -> int:
    return sum(self.lengths)


def scan_corpus(documents: Iterable[str], collect_characters: bool = False) -> CorpusScan:
  """One pass: document lengths, a content digest and, if asked, the set of characters (all a
  char vocabulary needs, so building one costs no second pass over the corpus)."""
  lengths = array.array("q")
  digest = hashlib.sha256()
  characters = set() if collect_characters else None
  for doc in documents:
    lengths.append(len(doc))
    digest.update(hashlib.sha256(doc.encode("utf-8")).digest())
    if characters is not None:
      characters.update(doc)
  return CorpusScan(lengths, digest.hexdigest(),
                    frozenset(characters) if characters is not None else None)


def plan_split(lengths: Sequence[int], val_fraction: float, shuffle: bool) -> np.ndarray:
  """Characters of each document that go to training (the rest, its end, to validation)."""
  if not 0.0 < val_fraction < 1.0:
    raise errors.UserError(f"data.val_fraction must be between 0 and 1, got {val_fraction}.")
  order = list(range(len(lengths)))
  if shuffle:
    random.Random(SPLIT_SHUFFLE_SEED).shuffle(order)
  total = sum(lengths)
  cut = total - int(round(total * val_fraction))  # character offset where validation begins
  train_chars = np.zeros(len(lengths), np.int64)
  seen = 0
  for i in order:
    train_chars[i] = min(max(cut - seen, 0), lengths[i])
    seen += lengths[i]
  return train_chars


def split_parts(documents: Iterable[str], train_chars: np.ndarray
                ) -> Iterator[tuple[str, str]]:
  """(training part, validation part) of each document; either may be empty."""
  for doc, keep in zip(documents, train_chars):
    yield doc[:keep], doc[keep:]


def split_documents(docs: Sequence[str], val_fraction: float, shuffle: bool
                    ) -> tuple[list[str], list[str]]:
  """Deterministic train/validation split of the documents by characters."""
  docs = list(docs)
  train_chars = plan_split([len(d) for d in docs], val_fraction, shuffle)
  train, val = [], []
  for train_part, val_part in split_parts(docs, train_chars):
    if train_part:
      train.append(train_part)
    if val_part:
      val.append(val_part)
  return train, val


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def encode_documents(tokenizer: Tokenizer, docs: Sequence[str]) -> np.ndarray:
  """All documents' ids in one array, each document followed by end-of-text."""
  dtype = token_dtype(tokenizer.vocab_size)
  pieces = []
  for ids in tokenizer.encode_batch(docs):
    pieces.append(np.asarray(ids, dtype=dtype))
    pieces.append(np.array([tokenizer.eos_id], dtype=dtype))
  return np.concatenate(pieces) if pieces else np.zeros((0,), dtype)


ENCODE_CHUNK_CHARS = 8_000_000  # text encoded at once; bounds the memory of encoding


def cache_fingerprint(corpus_digest: str, tokenizer: Tokenizer, settings: dict) -> str:
  digest = hashlib.sha256()
  digest.update(json.dumps(settings, sort_keys=True).encode())
  digest.update(tokenizer_fingerprint(tokenizer).encode())
  digest.update(corpus_digest.encode())
  return digest.hexdigest()[:24]


class _SplitWriter:
  """Appends encoded documents of one split to a file, a chunk at a time."""

  def __init__(self, path: Path, tokenizer: Tokenizer):
    self.tokenizer = tokenizer
    self.file = open(path, "wb")
    self.pending: list[str] = []
    self.pending_chars = self.num_tokens = self.num_bytes = 0

  def add(self, doc: str) -> None:
    if doc:
      self.pending.append(doc)
      self.pending_chars += len(doc)
      if self.pending_chars >= ENCODE_CHUNK_CHARS:
        self.flush()

  def flush(self) -> None:
    if self.pending:
      ids = encode_documents(self.tokenizer, self.pending)
      ids.tofile(self.file)
      self.num_tokens += len(ids)
      self.num_bytes += sum(len(d.encode("utf-8")) for d in self.pending)
    self.pending, self.pending_chars = [], 0

  def close(self) -> dict:
    self.flush()
    self.file.close()
    return {"num_tokens": self.num_tokens, "num_bytes": self.num_bytes}


def _encode_to_files(cache_dir: Path, tokenizer: Tokenizer, documents: Iterable[str],
                     train_chars: np.ndarray, num_characters: int) -> dict:
  from tqdm import tqdm

  with contextlib.ExitStack() as files:  # each <name>.bin appears whole, or not at all
    writers = {name: _SplitWriter(files.enter_context(atomic_path(cache_dir / f"{name}.bin")),
                                  tokenizer) for name in SPLITS}
    with tqdm(total=num_characters, unit="char", unit_scale=True, desc="encoding",
              disable=None, leave=False) as progress:
      for train_part, val_part in split_parts(documents, train_chars):
        writers["train"].add(train_part)
        writers["val"].add(val_part)
        progress.update(len(train_part) + len(val_part))
    return {name: writer.close() for name, writer in writers.items()}


def cached_splits(cache_dir: Path, tokenizer: Tokenizer, read_documents: Callable[[], Iterable[str]],
                  scan: CorpusScan, train_chars: np.ndarray, settings: dict
                  ) -> tuple[Split, Split]:
  """Encoded train and validation splits, from the cache when corpus and tokenizer match.

  read_documents() streams the corpus again; nothing is held in memory but one chunk.
  """
  cache_dir = Path(cache_dir)
  fingerprint = cache_fingerprint(scan.digest, tokenizer, settings)
  meta_path = cache_dir / META_FILE
  if meta_path.exists():
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("fingerprint") == fingerprint:
      return _load_split(cache_dir, meta, "train"), _load_split(cache_dir, meta, "val")

  cache_dir.mkdir(parents=True, exist_ok=True)
  meta_path.unlink(missing_ok=True)  # the old meta must never describe new arrays
  meta = {"fingerprint": fingerprint, "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
          "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
          "splits": _encode_to_files(cache_dir, tokenizer, read_documents(), train_chars,
                                     scan.num_characters)}
  write_atomic(meta_path, json.dumps(meta, indent=1))
  return _load_split(cache_dir, meta, "train"), _load_split(cache_dir, meta, "val")


def _load_split(cache_dir: Path, meta: dict, name: str) -> Split:
  info = meta["splits"][name]
  path = cache_dir / f"{name}.bin"
  if info["num_tokens"] == 0:
    tokens = np.zeros((0,), meta["dtype"])
  else:
    tokens = np.memmap(path, dtype=meta["dtype"], mode="r", shape=(info["num_tokens"],))
  return Split(tokens=tokens, num_bytes=info["num_bytes"])


def read_cached_split(cache_dir: Path, name: str) -> np.ndarray | None:
  """The token ids of split `name` in a workdir's cache (memory-mapped), or None without one."""
  meta_path = Path(cache_dir) / META_FILE
  if not meta_path.exists():
    return None
  return _load_split(Path(cache_dir), json.loads(meta_path.read_text(encoding="utf-8")),
                     name).tokens
