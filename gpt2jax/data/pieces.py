"""Documents in bounded pieces, cut where encoding the pieces one by one gives the token ids
that encoding the whole document would.

Every pass over a corpus (measuring, the tokenizer's sample, encoding, the split) and
gpt2jax.evaluate see a document as a stream of pieces of at most PIECE_CHARS characters, so
their memory is bounded by a piece, not by the largest document.

Where a piece ends, in order of preference:
1. just before a space that follows a non-whitespace character ("word| next"). Exact for the
   char tokenizer (exact anywhere), for gpt2jax's SentencePiece BPE (identity normalization,
   no dummy prefix: a piece may hold whitespace only at its start, and spaces start words),
   and for tokenizer.json files whose pre-tokenizer splits there: GPT-2's byte-level BPE
   (its regex never joins a non-space with the space after it), Metaspace, Whitespace.
   Not exact for a tokenizer.json whose normalizer changes the start of every text (e.g.
   Llama 2's Prepend("▁")): each piece then gets that start too.
2. just before a newline that follows a non-whitespace character, when the last half of the
   piece has no such space. Exact for char, SentencePiece (the newline is its own token) and
   GPT-2's byte-level BPE; not for tokenizers that add a space to a text's start (Metaspace,
   ByteLevel with add_prefix_space).
3. only when the last half of a piece has neither (a run of PIECE_CHARS / 2 characters
   without a space or newline after a non-space): before an ASCII character, or another
   character that starts a new one (never inside a character with its combining marks).
   Exact for char; ids of subword tokenizers can differ around such a cut.
Every cut keeps Unicode NFC normalization exact: normalizing the pieces one by one gives the
normalized document. The encoder checks each cut it meets (`cut_changes_ids`) and reports
how many changed ids.
"""

from __future__ import annotations

import unicodedata
from typing import Iterable, Iterator, NamedTuple

PIECE_CHARS = 1 << 20  # the longest piece of a document anything holds at once
CHECK_CHARS = 64  # context on each side of a cut when checking that it keeps the ids


class Piece(NamedTuple):
  text: str
  ends_document: bool  # the last piece of its document (end-of-text follows it)


def _last_after_non_space(text: str, char: str, lo: int, hi: int) -> int:
  """The largest p in [lo, hi) with text[p] == char and text[p-1] not whitespace, or -1."""
  p = text.rfind(char, lo, hi)
  while p > 0 and text[p - 1].isspace():
    p = text.rfind(char, lo, p)
  return p if p > 0 else -1


def _starts_character(text: str, p: int) -> bool:
  """Whether NFC normalizes text[:p] and text[p:] as it does the whole around p."""
  c = text[p]
  if c.isascii():
    return True  # no character combines with an ASCII one that follows it
  if unicodedata.combining(c):
    return False
  around = text[max(0, p - 8):p + 8]
  k = p - max(0, p - 8)
  return (unicodedata.normalize("NFC", around) == unicodedata.normalize("NFC", around[:k])
          + unicodedata.normalize("NFC", around[k:]))


def cut_point(text: str, start: int, limit: int | None = None) -> int:
  """Where the piece of text that begins at `start` ends: len(text) when the rest fits in
  `limit` characters (default PIECE_CHARS), else a position in (start, start + limit] by
  the rules above."""
  limit = limit or PIECE_CHARS
  end = start + limit
  if end >= len(text):
    return len(text)
  half = start + max(limit // 2, 1)
  for lo in (half, start + 1):
    for char in (" ", "\n"):
      p = _last_after_non_space(text, char, lo, end + 1)
      if p > start:
        return p
  for p in range(end, half - 1, -1):
    if p > start and _starts_character(text, p):
      return p
  return end


def document_pieces(doc: str, limit: int | None = None) -> Iterator[Piece]:
  """A document held in memory, as pieces (a lone empty piece for an empty document)."""
  start = 0
  while True:
    end = cut_point(doc, start, limit)
    yield Piece(doc[start:end], end == len(doc))
    if end == len(doc):
      return
    start = end


def as_pieces(items: Iterable[Piece | str]) -> Iterator[Piece]:
  """Pieces as they come, and a plain string as a whole document cut into pieces."""
  for item in items:
    if isinstance(item, str):
      yield from document_pieces(item)
    else:
      yield item


def join_documents(pieces: Iterable[Piece]) -> Iterator[str]:
  """Whole documents again, from their pieces (small corpora and tests)."""
  parts = []
  for piece in pieces:
    parts.append(piece.text)
    if piece.ends_document:
      yield "".join(parts)
      parts = []


def cut_changes_ids(tokenizer, before: str, after: str) -> bool:
  """Whether encoding the text around a cut in two parts gives other ids than encoding it at
  once (checked on CHECK_CHARS characters each side)."""
  if tokenizer.kind == "char":
    return False
  before, after = before[-CHECK_CHARS:], after[:CHECK_CHARS]
  whole, left, right = tokenizer.encode_batch([before + after, before, after])
  return whole != left + right
