"""What a workdir holds, and Orbax checkpoints of the training state.

  <workdir>/config.json     the resolved config of the run (JSON)
  <workdir>/tokenizer/      tokenizer.json (+ spm.model for BPE)
  <workdir>/data/           cached token ids (see gpt2jax.data.tokens)
  <workdir>/checkpoints/N/  Orbax checkpoint of step N: `state` (params, optimizer) and `meta`
  <workdir>/metrics.jsonl, samples.txt

Orbax writes each checkpoint into a temporary directory and renames it when complete, so an
interrupted save never replaces the last good checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections

from gpt2jax import errors

CONFIG_JSON = "config.json"
TOKENIZER_DIR = "tokenizer"
DATA_DIR = "data"
CHECKPOINT_DIR = "checkpoints"
METRICS_JSONL = "metrics.jsonl"
SAMPLES_TXT = "samples.txt"

# Config keys that fix the parameter shapes or the vocabulary: a resumed run must match them.
SHAPE_KEYS = (
    "model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.bias",
    "model.tie_embeddings", "model.scan_layers", "tokenizer.kind", "tokenizer.vocab_size",
)


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
    if key == "tokenizer.vocab_size" and _lookup(current, "tokenizer.kind") == "char":
      continue  # char vocabularies are sized by the corpus
    if before != after:
      diffs.append(f"{key}: {before!r} -> {after!r}")
  return diffs


def _placed(abstract_tree: Any) -> Any:
  """Restore targets: leaves that name no sharding go to this process's first device, so a
  checkpoint written on any mesh (e.g. FSDP over a pod) loads on one device."""
  import jax

  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda x: x if getattr(x, "sharding", None) is not None
      else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_tree)


class Checkpoints:
  """Orbax CheckpointManager under <workdir>/checkpoints.

  Each step holds three items: `params`, `opt_state` and `meta` (JSON), so that sampling can
  restore the parameters alone.
  """

  def __init__(self, workdir: Path, *, keep: int = 3, async_save: bool = True):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.directory = (Path(workdir) / CHECKPOINT_DIR).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        item_names=("params", "opt_state", "meta"),
    )

  def steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts saving `state` (with .params and .opt_state); returns before it is written."""
    ocp = self._ocp
    self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.JsonSave({**meta, "step": step})), force=True)

  def _check_step(self, step: int) -> None:
    if step not in self.steps():
      raise errors.UserError(f"No checkpoint for step {step} in {self.directory}; "
                             f"available steps: {self.steps() or 'none'}.")

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores onto the shapes, dtypes and shardings of abstract_state (a TrainState)."""
    ocp = self._ocp
    self._check_step(step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_placed(abstract_state.params)),
        opt_state=ocp.args.StandardRestore(_placed(abstract_state.opt_state)),
        meta=ocp.args.JsonRestore()))
    state = abstract_state.replace(step=jnp.asarray(step, jnp.int32), params=restored.params,
                                   opt_state=restored.opt_state)
    return state, dict(restored.meta)

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    ocp = self._ocp
    self._check_step(step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_placed(abstract_params))))
    return restored.params

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
