"""Errors meant for the person at the keyboard, and the checks that raise them early."""

from __future__ import annotations

import math
from typing import Mapping


class UserError(ValueError):
  """Bad input or state the user can fix; the message says how. Shown without a traceback."""


class TrainingDiverged(UserError):
  """The loss or the gradient norm became NaN or infinite; no checkpoint holds that state."""


def divergence_message(step: int, loss: float, grad_norm: float, last_checkpoint: str | None,
                       *, learning_rate: float, dtype: str, skipped_in_a_row: int = 0) -> str:
  """Names the step, what went non-finite, what is kept, and the usual causes."""
  what = f"loss {loss}, gradient norm {grad_norm}"
  if skipped_in_a_row:
    what += f"; {skipped_in_a_row} updates in a row were non-finite and skipped"
  kept = (f"the last good checkpoint is {last_checkpoint}, and rerunning resumes from it"
          if last_checkpoint else "no checkpoint had been written yet")
  causes = (f"a learning rate too high (train.learning_rate={learning_rate:g}: try it 3-10x "
            "lower, or more train.warmup_steps)")
  if dtype != "float32":
    causes += f", or {dtype} overflow (try --config.model.dtype=float32)"
  advice = "" if skipped_in_a_row else \
      " --config.train.skip_nonfinite=True skips such updates instead of stopping."
  return (f"Training diverged at step {step} ({what}); {kept}.\n"
          f"Likely cause: {causes}.{advice}")


# Checks of the device layout. gpt2jax.parallel calls them while building the mesh, so that a
# mesh or batch that cannot work is refused before anything is compiled or written.

def resolve_mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """The mesh axis sizes with the one -1 ("the rest of the devices") filled in.

  Raises UserError unless the sizes multiply to exactly num_devices.
  """
  sizes = dict(axis_sizes)
  described = " x ".join(f"mesh.{name}={size}" for name, size in sizes.items())
  wildcards = [name for name, size in sizes.items() if size == -1]
  bad = [name for name, size in sizes.items() if size != -1 and size < 1]
  if bad or len(wildcards) > 1:
    raise UserError(f"{described}: each mesh size must be at least 1, and at most one may be -1 "
                    "(the rest of the devices).")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if wildcards and num_devices % fixed:
    raise UserError(f"{described}: the {num_devices} devices do not split into groups of "
                    f"{fixed}; choose sizes whose product divides {num_devices}.")
  if not wildcards and fixed != num_devices:
    raise UserError(f"{described} needs {fixed} devices, but there are {num_devices}: make the "
                    f"product {num_devices}, or set one size to -1 for the rest of the devices "
                    "(e.g. --config.mesh.data=-1).")
  if wildcards:
    sizes[wildcards[0]] = num_devices // fixed
  return sizes


def check_batch_divides(batch_size: int, data_parallel: int, *, grad_accum_steps: int = 1,
                        process_count: int = 1) -> None:
  """The global batch must split evenly into micro-batches, then over the batch-sharded devices.

  data_parallel: the number of shards of the batch axis (product of the mesh axes the batch is
  sharded over, e.g. data x fsdp).
  """
  if grad_accum_steps < 1:
    raise UserError(f"train.grad_accum_steps must be at least 1, got {grad_accum_steps}.")
  if batch_size % grad_accum_steps:
    raise UserError(f"train.batch_size={batch_size} is not divisible by "
                    f"train.grad_accum_steps={grad_accum_steps}: use a multiple of it.")
  micro_batch = batch_size // grad_accum_steps
  shards = math.lcm(data_parallel, process_count)
  if micro_batch % shards:
    per = f"micro-batch {micro_batch} (batch_size / grad_accum_steps)" \
        if grad_accum_steps > 1 else f"train.batch_size={batch_size}"
    suggestion = -(-micro_batch // shards) * shards * grad_accum_steps
    raise UserError(f"The {per} is not divisible by the {shards}-way data parallelism of the "
                    f"mesh: make it a multiple of {shards}, e.g. --config.train.batch_size="
                    f"{suggestion}.")
