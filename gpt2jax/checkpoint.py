"""Orbax checkpoints of the training state: <workdir>/checkpoints/N/ for step N.

Each step holds three items: `params`, `opt_state` and `meta` (JSON), so that sampling can
restore the parameters alone. Orbax writes checkpoint N into `checkpoints/N.orbax-checkpoint-tmp/`
and renames it to `checkpoints/N/` only when every item is written (the rename is the commit).
A process killed during a save (kill -9 included) therefore leaves the earlier checkpoints as
they were, plus at most an unfinished `N.orbax-checkpoint-tmp` directory, which listing and
restoring ignore and the next training run removes (remove_unfinished_saves);
tests/test_preemption.py (test_kill_9_during_a_save_...) kills a run at each stage of a
save to check this. Whether a state is worth saving (finite parameters) is the training loop's
call (gpt2jax.train_lib), not this module's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from gpt2jax.errors import UserError
from gpt2jax.workdir import CHECKPOINT_DIR


def _placed(abstract_tree: Any) -> Any:
  """Restore targets: leaves that name no sharding go to this process's first device, so a
  checkpoint written on any mesh (e.g. FSDP over a pod) loads on one device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda x: x if getattr(x, "sharding", None) is not None
      else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_tree)


class Checkpoints:
  """Orbax CheckpointManager under <workdir>/checkpoints."""

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
    """Starts saving `state` (with .params and .opt_state); returns before it is written."""
    ocp = self._ocp
    self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.JsonSave({**meta, "step": step})), force=True)

  def _check_step(self, step: int) -> None:
    if step not in self.steps():
      raise UserError(f"No checkpoint for step {step} in {self.shown_directory}; "
                             f"available steps: {self.steps() or 'none'}.")

  def _restore(self, step: int, **items) -> Any:
    """Orbax restore; a checkpoint it cannot read becomes a UserError naming the step."""
    self._check_step(step)
    try:
      return self._manager.restore(step, args=self._ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises ValueError, KeyError, OSError, ... for bad files
      first_line = (str(e).strip().splitlines() or [""])[0][:200]
      raise UserError(
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
