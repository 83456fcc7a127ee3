"""Train/validation split, encoding to token ids, and the on-disk token cache.

Documents are shuffled with a fixed seed (so validation is a random sample of the corpus and
does not depend on config.seed), then the last `val_fraction` of the characters becomes the
validation split; the document that straddles the cut is cut in two. For a one-document corpus
this is nanoGPT's "first 90% train, last 10% validation".

Each split is stored as one flat array of ids with end-of-text after every document:
`<workdir>/data/{train,val}.bin` plus `tokens.json` (dtype, lengths, byte counts and a
fingerprint of corpus + tokenizer; a changed corpus or tokenizer re-encodes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Sequence

import numpy as np

from gpt2jax import errors
from gpt2jax.tokenizer import Tokenizer, tokenizer_fingerprint

SPLIT_SHUFFLE_SEED = 1234
META_FILE = "tokens.json"


@dataclasses.dataclass
class Split:
  tokens: np.ndarray  # [num_tokens] uint16 or uint32 (memory-mapped when cached)
  num_bytes: int  # UTF-8 bytes of the text these tokens encode

  @property
  def bytes_per_token(self) -> float:
    return self.num_bytes / max(len(self.tokens), 1)


def split_documents(docs: Sequence[str], val_fraction: float, shuffle: bool
                    ) -> tuple[list[str], list[str]]:
  """Deterministic train/validation split of the documents by characters."""
  if not 0.0 < val_fraction < 1.0:
    raise errors.UserError(f"data.val_fraction must be between 0 and 1, got {val_fraction}.")
  docs = list(docs)
  if shuffle:
    random.Random(SPLIT_SHUFFLE_SEED).shuffle(docs)
  total = sum(len(d) for d in docs)
  cut = total - int(round(total * val_fraction))  # character offset where validation begins
  train, val, seen = [], [], 0
  for doc in docs:
    if seen + len(doc) <= cut:
      train.append(doc)
    elif seen >= cut:
      val.append(doc)
    else:
      train.append(doc[: cut - seen])
      val.append(doc[cut - seen:])
    seen += len(doc)
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


def corpus_fingerprint(docs: Sequence[str], tokenizer: Tokenizer, settings: dict) -> str:
  digest = hashlib.sha256()
  digest.update(json.dumps(settings, sort_keys=True).encode())
  digest.update(tokenizer_fingerprint(tokenizer).encode())
  for doc in docs:
    digest.update(hashlib.sha256(doc.encode("utf-8")).digest())
  return digest.hexdigest()[:24]


def _write_array_atomic(path: Path, array: np.ndarray) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    array.tofile(f)
  os.replace(tmp, path)


def cached_splits(cache_dir: Path, tokenizer: Tokenizer, train_docs: Sequence[str],
                  val_docs: Sequence[str], settings: dict) -> tuple[Split, Split]:
  """Encoded train and validation splits, from the cache when corpus and tokenizer match."""
  cache_dir = Path(cache_dir)
  fingerprint = corpus_fingerprint([*train_docs, "\0split\0", *val_docs], tokenizer, settings)
  meta_path = cache_dir / META_FILE
  if meta_path.exists():
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("fingerprint") == fingerprint:
      return _load_split(cache_dir, meta, "train"), _load_split(cache_dir, meta, "val")

  cache_dir.mkdir(parents=True, exist_ok=True)
  meta_path.unlink(missing_ok=True)  # the old meta must never describe new arrays
  meta = {"fingerprint": fingerprint, "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
          "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "splits": {}}
  for name, docs in (("train", train_docs), ("val", val_docs)):
    ids = encode_documents(tokenizer, docs)
    _write_array_atomic(cache_dir / f"{name}.bin", ids)
    meta["splits"][name] = {"num_tokens": int(len(ids)),
                            "num_bytes": sum(len(d.encode("utf-8")) for d in docs)}
  tmp = meta_path.with_name(META_FILE + ".tmp")
  tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
  os.replace(tmp, meta_path)
  return _load_split(cache_dir, meta, "train"), _load_split(cache_dir, meta, "val")


def _load_split(cache_dir: Path, meta: dict, name: str) -> Split:
  info = meta["splits"][name]
  path = cache_dir / f"{name}.bin"
  if info["num_tokens"] == 0:
    tokens = np.zeros((0,), meta["dtype"])
  else:
    tokens = np.memmap(path, dtype=meta["dtype"], mode="r", shape=(info["num_tokens"],))
  return Split(tokens=tokens, num_bytes=info["num_bytes"])
