"""Train/validation split, encoding to token ids, and the on-disk token cache.

Which documents are held out is decided from their lengths alone: in an order shuffled with a
fixed seed (so validation is a random sample of the corpus and does not depend on
config.seed), the last `val_fraction` of the characters becomes the validation split, and the
document that straddles the cut is cut in two. Each split keeps the corpus order. For a
one-document corpus this is nanoGPT's "first 90% train, last 10% validation".

Each split is stored as one flat array of ids with end-of-text after every document:
`<workdir>/data/{train,val}.bin` plus `tokens.json` (dtype, lengths, byte counts and a
fingerprint of corpus + tokenizer; a changed corpus or tokenizer re-encodes). A corpus is read
as a stream of pieces of documents (pieces.py), three times (lengths, tokenizer sample,
encoding), and encoded a chunk of pieces at a time appended to the files, so memory stays
bounded however large the corpus or any document of it; the files are memory-mapped. A long
document is encoded piece by piece, cut where that keeps its ids (pieces.py says where it
may not; such cuts are counted in tokens.json and reported).
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from gpt2jax import errors
from gpt2jax.data.pieces import CHECK_CHARS, Piece, as_pieces, cut_changes_ids
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


def scan_corpus(documents: Iterable[Piece | str], collect_characters: bool = False
                ) -> CorpusScan:
  """One pass: document lengths, a content digest and, if asked, the set of characters (all a
  char vocabulary needs, so building one costs no second pass over the corpus)."""
  lengths = array.array("q")
  digest, document_digest = hashlib.sha256(), hashlib.sha256()
  length = 0
  characters = set() if collect_characters else None
  for piece in as_pieces(documents):
    length += len(piece.text)
    document_digest.update(piece.text.encode("utf-8"))
    if characters is not None:
      characters.update(piece.text)
    if piece.ends_document:
      lengths.append(length)
      digest.update(document_digest.digest())
      document_digest, length = hashlib.sha256(), 0
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


def split_pieces(pieces: Iterable[Piece], train_chars: np.ndarray
                 ) -> Iterator[tuple[str, Piece]]:
  """The pieces of each document tagged 'train' or 'val' (its first train_chars[i]
  characters, and the rest), as split_parts cuts whole documents: a document cut in two
  becomes two, each ending with end-of-text."""
  doc = offset = 0
  for piece in pieces:
    keep, end = int(train_chars[doc]), offset + len(piece.text)
    if offset < keep:  # the training part is never empty: it ends in the piece holding keep
      yield "train", Piece(piece.text[:keep - offset], keep <= end)
    val_text = piece.text[max(keep - offset, 0):]
    if val_text or (piece.ends_document and end > keep):
      yield "val", Piece(val_text, piece.ends_document)
    offset = end
    if piece.ends_document:
      doc, offset = doc + 1, 0


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


def encode_pieces(tokenizer: Tokenizer, pieces: Sequence[Piece]) -> np.ndarray:
  """The ids of pieces of documents in one array, end-of-text after each document's last."""
  dtype = token_dtype(tokenizer.vocab_size)
  texts = [piece.text for piece in pieces]
  if hasattr(tokenizer, "encode_array"):  # the char tokenizer: no Python lists
    encoded = [tokenizer.encode_array(t) for t in texts]
  else:
    encoded = tokenizer.encode_batch(texts)
  eos = np.array([tokenizer.eos_id], dtype=dtype)
  arrays = []
  for piece, ids in zip(pieces, encoded):
    arrays.append(np.asarray(ids, dtype=dtype))
    if piece.ends_document:
      arrays.append(eos)
  return np.concatenate(arrays) if arrays else np.zeros((0,), dtype)


def encode_documents(tokenizer: Tokenizer, docs: Sequence[str]) -> np.ndarray:
  """All documents' ids in one array, each document followed by end-of-text."""
  return encode_pieces(tokenizer, [Piece(doc, True) for doc in docs])


ENCODE_CHUNK_CHARS = 8_000_000  # text encoded at once; bounds the memory of encoding


def cache_fingerprint(corpus_digest: str, tokenizer: Tokenizer, settings: dict) -> str:
  digest = hashlib.sha256()
  digest.update(json.dumps(settings, sort_keys=True).encode())
  digest.update(tokenizer_fingerprint(tokenizer).encode())
  digest.update(corpus_digest.encode())
  return digest.hexdigest()[:24]


class _SplitWriter:
  """Appends encoded pieces of one split to a file, a chunk at a time, and checks each cut
  inside a document (pieces.cut_changes_ids)."""

  def __init__(self, path: Path, tokenizer: Tokenizer):
    self.tokenizer = tokenizer
    self.file = open(path, "wb")
    self.pending: list[Piece] = []
    self.pending_chars = self.num_tokens = self.num_bytes = 0
    self.tail: str | None = None  # the end of the last piece, while its document goes on
    self.cuts = self.changed_cuts = 0

  def add(self, piece: Piece) -> None:
    if self.tail is not None and piece.text:
      self.cuts += 1
      self.changed_cuts += cut_changes_ids(self.tokenizer, self.tail, piece.text)
    self.tail = None if piece.ends_document else ((self.tail or "") + piece.text)[-CHECK_CHARS:]
    self.pending.append(piece)
    self.pending_chars += len(piece.text)
    if self.pending_chars >= ENCODE_CHUNK_CHARS:
      self.flush()

  def flush(self) -> None:
    if self.pending:
      ids = encode_pieces(self.tokenizer, self.pending)
      ids.tofile(self.file)
      self.num_tokens += len(ids)
      self.num_bytes += sum(len(p.text.encode("utf-8")) for p in self.pending)
    self.pending, self.pending_chars = [], 0

  def close(self) -> dict:
    self.flush()
    self.file.close()
    return {"num_tokens": self.num_tokens, "num_bytes": self.num_bytes,
            "cuts": self.cuts, "cuts_that_change_ids": self.changed_cuts}


def _encode_to_files(cache_dir: Path, tokenizer: Tokenizer, pieces: Iterable[Piece],
                     train_chars: np.ndarray, num_characters: int) -> dict:
  from tqdm import tqdm

  with contextlib.ExitStack() as files:  # each <name>.bin appears whole, or not at all
    writers = {name: _SplitWriter(files.enter_context(atomic_path(cache_dir / f"{name}.bin")),
                                  tokenizer) for name in SPLITS}
    with tqdm(total=num_characters, unit="char", unit_scale=True, desc="encoding",
              disable=None, leave=False) as progress:
      for name, piece in split_pieces(pieces, train_chars):
        writers[name].add(piece)
        progress.update(len(piece.text))
    splits = {name: writer.close() for name, writer in writers.items()}
  cuts = sum(s["cuts"] for s in splits.values())
  changed = sum(s["cuts_that_change_ids"] for s in splits.values())
  if changed:
    print(f"note: long documents were encoded in pieces, and at {changed:,} of the {cuts:,} "
          f"cuts this {tokenizer.kind!r} tokenizer gives other ids than it would for the "
          "whole document (a few tokens each; see gpt2jax/data/pieces.py for where cuts go).",
          file=sys.stderr)
  return splits


def cached_splits(cache_dir: Path, tokenizer: Tokenizer,
                  read_documents: Callable[[], Iterable[Piece]],
                  scan: CorpusScan, train_chars: np.ndarray, settings: dict
                  ) -> tuple[Split, Split]:
  """Encoded train and validation splits, from the cache when corpus and tokenizer match.

  read_documents() streams the corpus again (pieces of documents); nothing is held in
  memory but one chunk.
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
