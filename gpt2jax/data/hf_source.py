"""Hugging Face `datasets` corpora: a dataset saved with `save_to_disk`, or one on the Hub.

`--config.data.corpus=hf --config.data.hf_path=DIR` reads a directory written by
`DatasetDict.save_to_disk` (the splits named by `data.hf_split`, '+' joining several) or by
`Dataset.save_to_disk` (one dataset, read whole: it has no splits to choose from, and a note
says so when data.hf_split names another than its own). Each row's `data.hf_text_field` is one
document, in order. Rows are read a batch at a time from the memory-mapped Arrow files, so a
dataset larger than memory works.

A data.hf_path that is no local path but looks like a Hub name (`roneneldan/TinyStories`) is
streamed from the Hugging Face Hub. Offline that stops at once with a message naming
save_to_disk (datasets itself would retry for ~25 s first); with HF_HUB_OFFLINE=1 the probe is
skipped and datasets decides alone.

`datasets` takes ~1.5 s to import: only `sources` imports this module, when data.corpus names
'hf'.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.parse
import urllib.request
from typing import Iterator

import datasets

from gpt2jax import errors

READ_BATCH = 256  # rows turned into Python strings at once
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # 'name' or 'owner/name'
_TEXT_TYPES = ("string", "large_string")


def documents(data_config) -> Iterator[str]:
  """The text field of every row of the chosen split(s), one document each, in order."""
  field = data_config.hf_text_field
  for where, part in open_splits(data_config):
    _check_field(part.features, field, where)
    if isinstance(part, datasets.Dataset):
      # Plain str whatever format the dataset was saved with; only this column is read.
      column = part.select_columns([field]).with_format(None)
      for batch in column.iter(batch_size=READ_BATCH):
        yield from (text for text in batch[field] if text)
    else:
      yield from _streamed_texts(part, field, where)


def open_splits(data_config) -> list[tuple[str, datasets.Dataset | datasets.IterableDataset]]:
  """(description, dataset) for each split to read, in the order data.hf_split names them."""
  path = data_config.hf_path
  if not path:
    raise errors.UserError(
        "data.corpus names 'hf' but data.hf_path is empty: pass --config.data.hf_path=DIR (a "
        "directory written by `save_to_disk`) or the name of a Hugging Face Hub dataset.")
  local = os.path.expanduser(path)
  if os.path.exists(local):
    return _saved_splits(data_config, local)
  if not _HUB_NAME.fullmatch(path):
    raise errors.UserError(
        f"data.hf_path={path!r} does not exist: pass a directory written by "
        "`Dataset.save_to_disk` or `DatasetDict.save_to_disk`, or a Hugging Face Hub dataset "
        "name such as 'roneneldan/TinyStories'.")
  return _hub_splits(data_config, path)


def _load_saved(data_config, local: str):
  try:
    return datasets.load_from_disk(local)
  except FileNotFoundError as e:
    raise errors.UserError(
        f"data.hf_path={data_config.hf_path!r} is not a dataset saved with `save_to_disk` "
        "(no dataset_dict.json or state.json in it): point it at the directory that "
        "`Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote.") from e


def _saved_splits(data_config, local: str) -> list:
  saved = _load_saved(data_config, local)
  shown = f"data.hf_path={data_config.hf_path!r}"
  if isinstance(saved, datasets.Dataset):
    return [(shown, saved)]
  names = data_config.hf_split.split("+")
  for name in names:
    if name not in saved:
      raise errors.UserError(
          f"data.hf_split={data_config.hf_split!r}: {name!r} is not a split of {shown} (it "
          f"has {list(saved)}; '+' joins splits).")
  return [(f"{shown} split {name!r}", saved[name]) for name in names]


def note(data_config) -> str | None:
  """Tells once that a single saved Dataset is read whole although data.hf_split names
  another split (None for a DatasetDict, a Hub name, or the default 'train')."""
  local = os.path.expanduser(data_config.hf_path)
  if not data_config.hf_path or not os.path.exists(local):
    return None
  saved = _load_saved(data_config, local)
  own = str(saved.split) if isinstance(saved, datasets.Dataset) and saved.split else None
  if isinstance(saved, datasets.DatasetDict) or data_config.hf_split in ("train", own):
    return None
  return (f"data.hf_path={data_config.hf_path!r} holds one dataset"
          + (f" (split {own!r})" if own else "") + ", not a DatasetDict: reading all of it; "
          f"data.hf_split={data_config.hf_split!r} does not apply")


def _check_field(features, field: str, where: str) -> None:
  if features is None:  # a streamed dataset may not know its features: checked row by row
    return
  if field not in features:
    raise errors.UserError(f"data.hf_text_field={field!r} is not a column of {where} (its "
                           f"columns: {list(features)}): set --config.data.hf_text_field.")
  feature = features[field]
  if not (isinstance(feature, datasets.Value) and feature.dtype in _TEXT_TYPES):
    texts = [name for name, f in features.items()
             if isinstance(f, datasets.Value) and f.dtype in _TEXT_TYPES]
    raise errors.UserError(
        f"data.hf_text_field={field!r} of {where} holds {feature}, not text: set "
        f"--config.data.hf_text_field to a string column (it has {texts}).")


def _streamed_texts(part, field: str, where: str) -> Iterator[str]:
  for row in part:
    if field not in row:
      raise errors.UserError(f"data.hf_text_field={field!r} is not a column of {where} (its "
                             f"columns: {list(row)}): set --config.data.hf_text_field.")
    text = row[field]
    if text is not None and not isinstance(text, str):
      raise errors.UserError(f"data.hf_text_field={field!r} of {where} holds "
                             f"{type(text).__name__} values, not text: set "
                             "--config.data.hf_text_field to a string column.")
    if text:
      yield text


def _hub_reachable(timeout: float = 3.0) -> bool:
  """Whether a connection to the Hub opens; behind a proxy a direct probe proves nothing."""
  if urllib.request.getproxies().get("https"):
    return True
  endpoint = urllib.parse.urlsplit(datasets.config.HF_ENDPOINT)
  port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
  try:
    socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    return True
  except OSError:
    return False


def _unreachable(name: str, offline_mode: bool) -> errors.UserError:
  why = " (HF_HUB_OFFLINE is set)" if offline_mode else ""
  return errors.UserError(
      f"data.hf_path={name!r} is not a local directory, and the Hugging Face Hub "
      f"({datasets.config.HF_ENDPOINT}) cannot be reached from this machine{why}: on a machine "
      f"with internet, run `datasets.load_dataset({name!r}).save_to_disk('DIR')`, copy DIR "
      "here and pass --config.data.hf_path=DIR.")


def _hub_splits(data_config, name: str) -> list:
  offline_mode = bool(datasets.config.HF_HUB_OFFLINE)
  if not offline_mode and not _hub_reachable():
    raise _unreachable(name, offline_mode)  # datasets would retry for ~25 s before failing
  parts = []
  for split in data_config.hf_split.split("+"):
    try:
      parts.append((f"Hub dataset {name!r} split {split!r}",
                    datasets.load_dataset(name, split=split, streaming=True)))
    except datasets.exceptions.DatasetNotFoundError as e:
      raise errors.UserError(
          f"data.hf_path={name!r} is neither a local directory nor a Hugging Face Hub dataset "
          f"({str(e).splitlines()[0]}): pass a directory written by `save_to_disk` or a Hub "
          "name such as 'roneneldan/TinyStories'.") from e
    except ConnectionError as e:  # offline mode with no cached copy, or the Hub went away
      raise _unreachable(name, offline_mode) from e
  return parts
