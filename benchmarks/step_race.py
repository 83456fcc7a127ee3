"""Train steps of several checkouts or dtypes, in turn in one process: a step A/B a busy host
cannot fake.

  python -m benchmarks.step_race --shape=R --variants=../before:float32,.:float32,.:bfloat16
  python -m benchmarks.step_race --shape=B --variants=.:float32,.:float32:0.2   # B against Bd

A variant is CHECKOUT:DTYPE[:DROPOUT], CHECKOUT a gpt2jax checkout (`.` this one, or a git
worktree of another commit). Each checkout's `benchmarks.measure.train_setup` builds and
compiles the shape's train step with its own gpt2jax, imported in turn (the modules of one
are dropped before the next is imported); then the compiled steps run in blocks of --steps,
the variants' order reversed every round, each on its own state. Separate processes on a VM
whose host changes speed from minute to minute can disagree by 30% on the same code; blocks a
few hundred milliseconds apart see the same host. Prints each variant's median and fastest
block (ms per step) and its speed against the first variant, and writes
benchmarks/results/step-race-<shape>-<time>-<host>.json.
"""

from __future__ import annotations

import dataclasses
import importlib
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags
import jax

from benchmarks import results
from gpt2jax.model import DTYPES  # this checkout's; each variant's own gpt2jax is imported later

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Variant:
  checkout: Path
  dtype: str
  dropout: float | None  # None: the shape's own

  @classmethod
  def parse(cls, spec: str) -> "Variant":
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[1] not in DTYPES:
      raise app.UsageError(f"--variants: {spec!r} is not CHECKOUT:DTYPE[:DROPOUT], e.g. "
                           ".:bfloat16 or ../before:float32:0.2")
    checkout = (REPO if parts[0] == "." else Path(parts[0])).resolve()
    if not (checkout / "gpt2jax" / "model.py").is_file():
      raise app.UsageError(f"--variants: {checkout} is not a gpt2jax checkout (no "
                           "gpt2jax/model.py); make one with `git worktree add DIR COMMIT`.")
    return cls(checkout, parts[1], float(parts[2]) if len(parts) == 3 else None)

  def __str__(self) -> str:
    name = "." if self.checkout == REPO else str(self.checkout)
    return f"{name}:{self.dtype}" + ("" if self.dropout is None else f":{self.dropout}")


def import_measure(checkout: Path):
  """benchmarks.measure of `checkout`, with its own gpt2jax (another checkout's dropped)."""
  for name in [n for n in sys.modules if n.split(".")[0] in ("gpt2jax", "benchmarks", "configs")
               and n != "benchmarks.results"]:
    del sys.modules[name]
  sys.path.insert(0, str(checkout))
  try:
    measure = importlib.import_module("benchmarks.measure")
  finally:
    sys.path.remove(str(checkout))
  if not Path(measure.__file__).resolve().is_relative_to(checkout):
    raise RuntimeError(f"imported {measure.__file__}, not {checkout}'s")
  return measure


@dataclasses.dataclass
class Run:
  variant: Variant
  step: object  # the compiled train step
  state: object
  batches: list
  block_ms: list = dataclasses.field(default_factory=list)

  def block(self, steps: int) -> None:
    start = time.perf_counter()
    for i in range(steps):
      self.state, metrics = self.step(self.state, self.batches[i % 2])
    jax.block_until_ready(metrics)
    self.block_ms.append((time.perf_counter() - start) / steps * 1e3)


def prepare(variant: Variant, shape_name: str) -> Run:
  """The variant's compiled step, its state and batches, after three warm-up steps."""
  measure = import_measure(variant.checkout)
  if shape_name not in measure.SHAPES:
    raise app.UsageError(f"--shape={shape_name} is not one of {sorted(measure.SHAPES)}.")
  shape = dataclasses.replace(measure.SHAPES[shape_name], dtype=variant.dtype)
  if variant.dropout is not None:
    shape = dataclasses.replace(shape, dropout=variant.dropout)
  state, step, batches = measure.train_setup(shape)
  compiled = step.lower(state, batches[0]).compile()
  for i in range(3):
    state, metrics = compiled(state, batches[i % 2])
  jax.block_until_ready(metrics)
  return Run(variant, compiled, state, batches)


def race(runs: list[Run], rounds: int, steps: int) -> None:
  for r in range(rounds):
    for run in (runs if r % 2 == 0 else runs[::-1]):
      run.block(steps)


def _define_flags() -> None:
  """Only when run as a program: the tests import this module beside benchmarks.profile,
  whose --shape is its own."""
  flags.DEFINE_string("shape", "R", "A shape of benchmarks/measure.py (R, A, B, Bd, C, H).")
  flags.DEFINE_list("variants", [".:float32", ".:bfloat16"],
                    "CHECKOUT:DTYPE[:DROPOUT], the first one the baseline.")
  flags.DEFINE_integer("rounds", 12, "Blocks per variant.")
  flags.DEFINE_integer("steps", 10, "Steps per block.")
  flags.DEFINE_string("out", str(REPO / "benchmarks" / "results"), "Where the JSON goes.")


def main(argv):
  del argv
  given = flags.FLAGS
  variants = [Variant.parse(spec) for spec in given.variants]
  runs = [prepare(variant, given.shape) for variant in variants]
  load_before = results.load_1min()
  race(runs, given.rounds, given.steps)
  baseline = statistics.median(runs[0].block_ms)
  rows = [{"variant": str(run.variant), "median_ms": statistics.median(run.block_ms),
           "fastest_ms": min(run.block_ms), "block_ms": run.block_ms,
           "speed_vs_first": baseline / statistics.median(run.block_ms)} for run in runs]
  print(f"shape {given.shape}, {given.rounds} rounds of {given.steps} steps, "
        f"load {load_before} -> {results.load_1min()}")
  print("| variant | median ms/step | fastest | speed against the first |\n| --- | ---: | ---: | ---: |")
  for row in rows:
    print(f"| {row['variant']} | {row['median_ms']:.2f} | {row['fastest_ms']:.2f} | "
          f"{row['speed_vs_first']:.3f}× |")
  path = results.write({"machine": results.machine(), "shape": given.shape,
                        "rounds": given.rounds, "steps": given.steps, "variants": rows},
                       given.out, f"step-race-{given.shape}")
  print(f"wrote {path}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
