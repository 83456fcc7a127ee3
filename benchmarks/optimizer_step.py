"""Train step time with AdamW and with Muon, interleaved: rounds of steps alternating optimizers.

  python -m benchmarks.optimizer_step --shapes=R,H --rounds=6 --steps=20

R is nanoGPT's CPU recipe (configs/shakespeare_char_cpu.py), H the default run of
configs/hebrew.py (dropout 0.1). Each round times `steps` jitted, donated steps of each
optimizer in turn, so both see the same minutes of a shared host; it prints the median and the
range of the per-round median step times, and Muon's ratio to AdamW's per round.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gpt2jax  # noqa: E402,F401  (process settings first)

from benchmarks import measure  # noqa: E402
from benchmarks.measure import SHAPES, Shape  # noqa: E402
from gpt2jax import optim  # noqa: E402

STEP_SHAPES = {name: SHAPES[name] for name in ("R", "H")}

_SHAPES = flags.DEFINE_list("shapes", ["R", "H"], f"Of {sorted(STEP_SHAPES)}.")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "Alternations of the two optimizers.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per optimizer per round.")


def compiled_step(shape: Shape, optimizer_name: str):
  """(state, step, batches) after two warm-up steps."""
  state, step, batches = measure.train_setup(shape, optimizer_name)
  state, _ = measure.timed_steps(state, step, batches, 2)
  return state, step, batches


def timed_round(state, step, batches, steps: int):
  state, times = measure.timed_steps(state, step, batches, steps)
  return state, statistics.median(times)


def main(_) -> None:
  for name in _SHAPES.value:
    shape = STEP_SHAPES[name]
    runs = {opt: list(compiled_step(shape, opt)) for opt in optim.OPTIMIZERS}
    medians = {opt: [] for opt in runs}
    for _ in range(_ROUNDS.value):
      for opt, run in runs.items():
        run[0], seconds = timed_round(*run, _STEPS.value)
        medians[opt].append(seconds)
    tokens = shape.batch_size * shape.block_size
    for opt, seconds in medians.items():
      print(f"{name} {opt:5s}: step {statistics.median(seconds) * 1e3:.1f} ms "
            f"(rounds {min(seconds) * 1e3:.1f}-{max(seconds) * 1e3:.1f}), "
            f"{tokens / statistics.median(seconds):,.0f} tokens/s")
    ratios = [m / a for m, a in zip(medians["muon"], medians["adamw"])]
    print(f"{name} muon/adamw step time per round: " + ", ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
  app.run(main)
