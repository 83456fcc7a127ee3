"""Errors meant for the person at the keyboard: UserError (shown without a traceback) and a
diverged run's message."""

from __future__ import annotations


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
