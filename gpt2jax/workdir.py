"""What a workdir holds, and the files every room writes into it safely.

  <workdir>/config.json     the resolved config of the run (JSON)
  <workdir>/tokenizer/      tokenizer.json (+ spm.model for BPE)
  <workdir>/data/           cached token ids (see gpt2jax.data.tokens)
  <workdir>/checkpoints/N/  Orbax checkpoint of step N (see gpt2jax.checkpoint)
  <workdir>/metrics.jsonl, samples.txt, summary.json, tensorboard/ (see gpt2jax.metrics)
  <workdir>/plots/          loss.png (see gpt2jax.plots)
  <workdir>/.lock           held by the training run using the workdir

This is the lowest room that knows about files: the path names, config.json, the check that a
resumed run has the shape of its checkpoints, the lock, and `write_atomic`, the one way a file
is replaced (written under a temporary name, then renamed, so a crash never leaves half a
file in place of a good one). Only JSON, Orbax (tensorstore) files and the SentencePiece model
are ever read from a workdir: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator

import ml_collections

from gpt2jax.errors import UserError

CONFIG_JSON = "config.json"
TOKENIZER_DIR = "tokenizer"
DATA_DIR = "data"
CHECKPOINT_DIR = "checkpoints"
METRICS_JSONL = "metrics.jsonl"
SAMPLES_TXT = "samples.txt"
SUMMARY_JSON = "summary.json"
TENSORBOARD_DIR = "tensorboard"
PLOTS_DIR = "plots"
LOCK_FILE = ".lock"

# Config keys that fix the parameter shapes or the vocabulary: a resumed run must match them.
SHAPE_KEYS = (
    "model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.bias",
    "model.tie_embeddings", "model.scan_layers", "model.vocab_size", "tokenizer.kind",
    "tokenizer.vocab_size", "train.optimizer",
)
# What a workdir written before a key existed used: it resumes under that value.
KEY_DEFAULTS = {"train.optimizer": "adamw"}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """A temporary path beside `path` to write to; renamed over `path` when the block ends
  without an error (and removed when it ends with one)."""
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  try:
    yield tmp
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  os.replace(tmp, path)


def write_atomic(path: str | os.PathLike, content: str | bytes) -> Path:
  """Replaces path's content (text as UTF-8) at once: never half a file."""
  with atomic_path(path) as tmp:
    if isinstance(content, bytes):
      tmp.write_bytes(content)
    else:
      tmp.write_text(content, encoding="utf-8")
  return Path(path)


def save_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
  write_atomic(Path(workdir) / CONFIG_JSON,
               json.dumps(config.to_dict(), indent=1, ensure_ascii=False))


def load_config(workdir: Path) -> ml_collections.ConfigDict:
  path = Path(workdir) / CONFIG_JSON
  if not path.exists():
    raise UserError(f"{workdir} holds no {CONFIG_JSON}: is it a gpt2jax workdir? "
                    "Train one with `python train.py --config=configs/<recipe>.py`.")
  return ml_collections.ConfigDict(json.loads(path.read_text(encoding="utf-8")))


def _lookup(config, dotted: str):
  value = config
  for part in dotted.split("."):
    if part not in value:
      return None
    value = value[part]
  return value


def shape_differences(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict
                      ) -> list[str]:
  """Human-readable 'key: saved -> current' for each shape key that changed."""
  diffs = []
  for key in SHAPE_KEYS:
    before, after = (KEY_DEFAULTS.get(key) if value is None else value
                     for value in (_lookup(saved, key), _lookup(current, key)))
    if key == "tokenizer.vocab_size" and _lookup(current, "tokenizer.kind") in ("char", "hf"):
      continue  # sized by the corpus, or by the tokenizer file
    if key == "model.vocab_size" and not after:
      continue  # 0: the tokenizer's, which the keys above already compare
    if before != after:
      diffs.append(f"{key}: {before!r} -> {after!r}")
  return diffs


def check_resumable(workdir: Path, config: ml_collections.ConfigDict, has_checkpoints: bool
                    ) -> None:
  """A workdir with checkpoints may only be resumed by a config of the same shape, tokenizer
  and optimizer."""
  if not has_checkpoints or not (Path(workdir) / CONFIG_JSON).exists():
    return
  saved = load_config(workdir)
  diffs = shape_differences(saved, config)
  if not diffs:
    return
  if any(d.startswith("model.") for d in diffs):
    what, fix = "a differently shaped model", "the same settings"
  elif any(d.startswith("tokenizer.") for d in diffs):
    what, fix = "a model with another tokenizer", "the same settings"
  else:  # the optimizer state's tree differs
    what = "another optimizer's state"
    fix = f"--config.train.optimizer={saved.train.get('optimizer', 'adamw')}"
  raise UserError(f"{workdir} holds checkpoints of {what} ({'; '.join(diffs)}). "
                  f"Use a new --workdir, or {fix} to resume.")


class WorkdirLock:
  """An exclusive lock on <workdir>/.lock for the duration of a training run.

  Two training runs on one workdir would interleave their checkpoints and metrics. The lock
  is an flock, which the operating system releases when the process ends in any way (kill -9
  included), so a crashed run never leaves a stale lock behind.
  """

  def __init__(self, workdir: Path, *, enabled: bool = True):
    self.path = Path(workdir) / LOCK_FILE
    self.enabled = enabled and "://" not in str(workdir)  # only local filesystems have flock
    self._file = None

  def __enter__(self) -> "WorkdirLock":
    if not self.enabled:
      return self
    self._file = open(self.path, "a+", encoding="utf-8")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      owner = self._file.read().strip() or "another process"
      self._file.close()
      raise UserError(
          f"{self.path.parent} is in use by another training run ({owner}): wait for it to "
          "finish or stop it, or use another --workdir.") from None
    except OSError:  # a filesystem without locks (some network mounts): go on without one
      return self
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f"pid {os.getpid()}\n")
    self._file.flush()
    return self

  def __exit__(self, *exc_info) -> None:
    if self._file is not None and not self._file.closed:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
