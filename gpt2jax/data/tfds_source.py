"""TensorFlow Datasets corpora, read as array_record through `tfds` data sources.

`--config.data.corpus=tfds --config.data.tfds=NAME` (e.g. `tiny_shakespeare`, `wiki40b/he`,
`lm1b`) reads the examples of `data.tfds_split` and takes the text of `data.tfds_text_field`
from each as one document. Reading needs no TensorFlow. A dataset not yet in
`data.tfds_data_dir` (default: TFDS's own, ~/tensorflow_datasets or $TFDS_DATA_DIR) is
downloaded and prepared there once, in the array_record format; offline, TFDS takes the
source files from the manual directory (`data.tfds_manual_dir`, default
`<data_dir>/downloads/manual`) when they are there. Paths may be local or gs://.

Preparing most stock datasets runs their TFDS builder, which may need TensorFlow (or Apache
Beam for the largest); Tiny Shakespeare is prepared here without it.
"""

from __future__ import annotations

import os
import socket
from typing import Iterator

from etils import epath

from gpt2jax import errors

READ_BATCH = 256  # records fetched per array_record read
_PROBE_HOST = ("storage.googleapis.com", 443)  # where TFDS looks first for prepared data


class Unavailable(Exception):
  """The dataset is not prepared and cannot be prepared here (offline, or missing deps)."""


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _builder(name: str, data_dir: str):
  import tensorflow_datasets as tfds

  base = name.split("/")[0].split(":")[0]
  if base == "tiny_shakespeare":
    return _tiny_shakespeare_class()(data_dir=data_dir, file_format="array_record")
  try:
    return tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    raise errors.UserError(f"data.tfds={name!r} is not a TFDS dataset: "
                           f"{str(e).splitlines()[0]}") from e


def _tiny_shakespeare_class():
  """The stock builder reads its download with tf.io.gfile; this one does not need TF."""
  from tensorflow_datasets.datasets.tiny_shakespeare import tiny_shakespeare_dataset_builder

  stock = tiny_shakespeare_dataset_builder.Builder

  class TinyShakespeare(stock, skip_registration=True):
    name = "tiny_shakespeare"
    code_path = stock.code_path  # its checksums.tsv, which lets a manual_dir copy be used

    def _split_generators(self, dl_manager):
      path = epath.Path(dl_manager.download(
          "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
          "input.txt"))
      text = path.read_text(encoding="utf-8")
      # The stock 90% / 5% / 5% split, so the prepared files are the same.
      cut = int(len(text) * 0.9)
      train, rest = text[:cut], text[cut:]
      cut = int(len(rest) * 0.5)
      parts = {"train": train, "validation": rest[:cut], "test": rest[cut:]}
      import tensorflow_datasets as tfds

      return [tfds.core.SplitGenerator(name=key, gen_kwargs={"split_key": key, "split_text": t})
              for key, t in parts.items()]

  return TinyShakespeare


def _online(timeout: float = 3.0) -> bool:
  try:
    socket.create_connection(_PROBE_HOST, timeout=timeout).close()
    return True
  except OSError:
    return False


def _prepare(builder, name: str, manual_dir: epath.Path) -> None:
  import tensorflow_datasets as tfds

  has_manual_files = manual_dir.exists() and any(manual_dir.iterdir())
  if not has_manual_files and not _online():
    # TFDS itself would retry the download for minutes before giving up.
    raise Unavailable(f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and this "
                      f"machine is offline (no files in the manual directory {manual_dir} "
                      "either)")
  try:
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  except ModuleNotFoundError as e:  # tensorflow, apache_beam, ...
    raise Unavailable(
        f"preparing TFDS dataset {name!r} needs the package {e.name!r} (reading it does not): "
        f"install it once to prepare, or prepare the dataset elsewhere as array_record and "
        f"copy it to {builder.data_dir}") from e
  except OSError as e:  # requests' connection errors are OSErrors too
    raise Unavailable(f"downloading TFDS dataset {name!r} failed "
                      f"({str(e).strip().splitlines()[0][:200]})") from e


def open_split(data_config):
  """The array_record data source of data.tfds_split, prepared first if need be."""
  name = data_config.tfds
  if not name:
    raise errors.UserError("data.corpus names 'tfds' but data.tfds is empty: name a dataset, "
                           "e.g. --config.data.tfds=tiny_shakespeare.")
  data_dir = data_config.tfds_data_dir or default_data_dir()
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    manual_dir = epath.Path(data_config.tfds_manual_dir or
                            epath.Path(data_dir) / "downloads" / "manual")
    _prepare(builder, name, manual_dir)
  try:
    return builder.as_data_source(split=data_config.tfds_split)
  except NotImplementedError as e:
    raise errors.UserError(
        f"TFDS dataset {name!r} in {builder.data_dir} was prepared in another file format; "
        "gpt2jax reads array_record: use another --config.data.tfds_data_dir or delete it "
        "to prepare it again.") from e
  except (KeyError, ValueError) as e:
    splits = sorted(builder.info.splits)
    raise errors.UserError(f"data.tfds_split={data_config.tfds_split!r} is not a split of "
                           f"{name!r} (it has {splits}; '+' joins splits).") from e


def documents(data_config, source) -> Iterator[str]:
  """The text field of every example of the split (from open_split), one document each, in
  order."""
  field = data_config.tfds_text_field
  for start in range(0, len(source), READ_BATCH):
    for example in source.__getitems__(list(range(start, min(start + READ_BATCH, len(source))))):
      if field not in example:
        raise errors.UserError(
            f"TFDS dataset {data_config.tfds!r} has no field {field!r}; its examples have "
            f"{sorted(example)}: set --config.data.tfds_text_field.")
      text = example[field]
      yield text.decode("utf-8") if isinstance(text, bytes) else str(text)
