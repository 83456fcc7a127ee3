"""What training does about NaN and infinity: it stops, and never checkpoints such a state.

The train step flags a non-finite loss or gradient norm per step (steps.make_train_step);
NonfiniteGuard reads those flags where the loop reads metrics anyway and stops the run with
errors.TrainingDiverged, and checks the parameters before every save (all_finite).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from gpt2jax.checkpoint import Checkpoints
from gpt2jax.errors import TrainingDiverged, divergence_message
from gpt2jax.metrics import Interval


@jax.jit
def _all_finite(tree) -> jax.Array:
  # x * 0 is 0 where x is finite and NaN where it is not, so one sum says it for all leaves
  # and cannot overflow; a third of the compilation of an isfinite().all() per leaf.
  return jnp.isfinite(sum(jnp.sum(x * 0) for x in jax.tree_util.tree_leaves(tree)))


def all_finite(tree) -> bool:
  """True when no floating-point leaf of the pytree holds NaN or infinity."""
  floats = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return bool(_all_finite(floats)) if floats else True


class NonfiniteGuard:
  """Stops training at the first NaN/inf loss or gradient norm, before it is checkpointed.

  It reads the per-step flags only where the loop reads metrics anyway (log lines, saves).
  With train.skip_nonfinite such updates were skipped inside the step; the guard stops only
  when MAX_SKIPPED_IN_A_ROW of them come in a row (the run is not recovering).
  """

  MAX_SKIPPED_IN_A_ROW = 20

  def __init__(self, config: ml_collections.ConfigDict, checkpoints: Checkpoints):
    self.config, self.checkpoints = config, checkpoints
    self.skip = bool(config.train.get("skip_nonfinite", False))
    self.skipped_in_a_row = 0

  def check(self, interval: Interval, step: int) -> None:
    """Stops at a flagged step among those of interval not yet checked; step: the last one."""
    host = interval.host()
    for i in range(interval.checked, len(host)):
      if not host[i]["nonfinite"]:
        self.skipped_in_a_row = 0
        continue
      self.skipped_in_a_row += 1
      if not self.skip or self.skipped_in_a_row >= self.MAX_SKIPPED_IN_A_ROW:
        self._stop(step - len(host) + 1 + i, host[i])
    interval.checked = len(host)

  def check_params(self, params, step: int) -> None:
    """Refuses to let parameters that hold NaN or infinity be saved as checkpoint `step`: a
    checkpoint is always a state to resume from."""
    if not all_finite(params):
      raise TrainingDiverged(
          f"Not saving checkpoint {step}: its parameters hold NaN or infinite values. The "
          f"checkpoints already in {self.checkpoints.shown_directory} are kept.")

  def _stop(self, bad_step: int, step_metrics: dict) -> None:
    latest = self.checkpoints.latest_step()
    raise TrainingDiverged(divergence_message(
        bad_step, float(step_metrics["loss"]), float(step_metrics["grad_norm"]),
        str(self.checkpoints.path(latest)) if latest else None,
        learning_rate=self.config.train.learning_rate, dtype=self.config.model.dtype,
        skipped_in_a_row=self.skipped_in_a_row if self.skip else 0))
