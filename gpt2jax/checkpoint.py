"""What a workdir holds, and Orbax checkpoints of the training state.

  <workdir>/config.json     the resolved config of the run (JSON)
  <workdir>/tokenizer/      tokenizer.json (+ spm.model for BPE)
  <workdir>/data/           cached token ids (see gpt2jax.data.tokens)
  <workdir>/checkpoints/N/  Orbax checkpoint of step N: `state` (params, optimizer) and `meta`
  <workdir>/metrics.jsonl, samples.txt

Orbax writes checkpoint N into `checkpoints/N.orbax-checkpoint-tmp/` and renames it to
`checkpoints/N/` only when every item is written (the rename is the commit). A process killed
during a save (kill -9 included) therefore leaves the earlier checkpoints as they were, plus at
most an unfinished `N.orbax-checkpoint-tmp` directory, which listing and restoring ignore and
the next training run removes (remove_unfinished_saves). tests/test_robustness.py kills a run at each stage of a save to
check this. Only JSON, Orbax (tensorstore) files and the SentencePiece model are ever read
from a workdir: nothing is unpickled.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from gpt2jax import errors

CONFIG_JSON = "config.json"
TOKENIZER_DIR = "tokenizer"
DATA_DIR = "data"
CHECKPOINT_DIR = "checkpoints"
METRICS_JSONL = "metrics.jsonl"
SAMPLES_TXT = "samples.txt"
LOCK_FILE = ".lock"  # held by the training run using the workdir

# Config keys that fix the parameter shapes, the vocabulary or the optimizer state's tree: a
# resumed run must match them.
SHAPE_KEYS = (
    "model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.bias",
    "model.tie_embeddings", "model.scan_layers", "model.vocab_size", "tokenizer.kind",
    "tokenizer.vocab_size", "train.optimizer",
)
# What a workdir written before a key existed used: it resumes under that value.
KEY_DEFAULTS = {"train.optimizer": "adamw"}


def save_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
  path = Path(workdir) / CONFIG_JSON
  tmp = path.with_name(CONFIG_JSON + ".tmp")
  tmp.write_text(json.dumps(config.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
  os.replace(tmp, path)


def load_config(workdir: Path) -> ml_collections.ConfigDict:
  path = Path(workdir) / CONFIG_JSON
  if not path.exists():
    raise errors.UserError(f"{workdir} holds no {CONFIG_JSON}: is it a gpt2jax workdir? "
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
    before, after = _lookup(saved, key), _lookup(current, key)
    if before is None:
      before = KEY_DEFAULTS.get(key)
    if key == "tokenizer.vocab_size" and _lookup(current, "tokenizer.kind") in ("char", "hf"):
      continue  # sized by the corpus, or by the tokenizer file
    if key == "model.vocab_size" and not after:
      continue  # 0: the tokenizer's, which the keys above already compare
    if before != after:
      diffs.append(f"{key}: {before!r} -> {after!r}")
  return diffs


def _placed(abstract_tree: Any) -> Any:
  """Restore targets: leaves that name no sharding go to this process's first device, so a
  checkpoint written on any mesh (e.g. FSDP over a pod) loads on one device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda x: x if getattr(x, "sharding", None) is not None
      else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_tree)


class Checkpoints:
  """Orbax CheckpointManager under <workdir>/checkpoints.

  Each step holds three items: `params`, `opt_state` and `meta` (JSON), so that sampling can
  restore the parameters alone.
  """

  def __init__(self, workdir: Path, *, keep: int = 3, async_save: bool = True,
               for_training: bool = True):
    """for_training=False only reads: it creates no directory."""
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.shown_directory = Path(workdir) / CHECKPOINT_DIR  # as the user named it, for messages
    self.directory = self.shown_directory.absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=for_training),
        item_names=("params", "opt_state", "meta"),
    )

  def remove_unfinished_saves(self) -> list[str]:
    """Deletes what saves cut short by a crash left (N.orbax-checkpoint-tmp/); their names.

    Only the training run that holds the workdir's lock may call this: a save in progress
    looks the same.
    """
    unfinished = self._ocp.path.step.all_temporary_paths(self.directory)
    for temporary in unfinished:
      temporary.get().rmtree()
    return sorted(temporary.get().name for temporary in unfinished)

  def steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def path(self, step: int) -> Path:
    return self.shown_directory / str(step)

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts saving `state` (with .params and .opt_state); returns before it is written.

    Refuses parameters that hold NaN or infinity: a checkpoint is always a state to resume from.
    """
    ocp = self._ocp
    if not all_finite(state.params):
      raise errors.TrainingDiverged(
          f"Not saving checkpoint {step}: its parameters hold NaN or infinite values. The "
          f"checkpoints already in {self.shown_directory} are kept.")
    self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.JsonSave({**meta, "step": step})), force=True)

  def _check_step(self, step: int) -> None:
    if step not in self.steps():
      raise errors.UserError(f"No checkpoint for step {step} in {self.shown_directory}; "
                             f"available steps: {self.steps() or 'none'}.")

  def _restore(self, step: int, **items) -> Any:
    """Orbax restore; a checkpoint it cannot read becomes a UserError naming the step."""
    self._check_step(step)
    try:
      return self._manager.restore(step, args=self._ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises ValueError, KeyError, OSError, ... for bad files
      first_line = (str(e).strip().splitlines() or [""])[0][:200]
      raise errors.UserError(
          f"Checkpoint {self.path(step)} cannot be read ({type(e).__name__}: {first_line}). "
          f"If it is damaged, move it aside (mv {self.path(step)} {self.path(step)}.damaged) "
          f"to use an earlier one; steps here: {self.steps()}.") from e

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores onto the shapes, dtypes and shardings of abstract_state (a TrainState)."""
    ocp = self._ocp
    restored = self._restore(
        step, params=ocp.args.StandardRestore(_placed(abstract_state.params)),
        opt_state=ocp.args.StandardRestore(_placed(abstract_state.opt_state)),
        meta=ocp.args.JsonRestore())
    state = abstract_state.replace(step=jnp.asarray(step, jnp.int32), params=restored.params,
                                   opt_state=restored.opt_state)
    return state, dict(restored.meta)

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    restored = self._restore(step, params=self._ocp.args.StandardRestore(_placed(abstract_params)))
    return restored.params

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)]))


def all_finite(tree) -> bool:
  """True when no floating-point leaf of the pytree holds NaN or infinity."""
  floats = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return bool(_all_finite(floats)) if floats else True


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
      raise errors.UserError(
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
