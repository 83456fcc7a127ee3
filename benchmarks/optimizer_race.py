"""Steps and wall time for runs to reach a reference run's final validation loss.

  python -m benchmarks.optimizer_race runs/adamw runs/muon_0.02 runs/muon_0.04

The first workdir is the reference (e.g. AdamW); for each workdir it prints the final and best
validation loss, and the first evaluation at or below the reference's final one: its step and
elapsed_seconds (wall time since the start of the command's training loop, as metrics.jsonl
records it); then, for each evaluation of the reference, the step (and seconds) at which each
other run first matched its validation loss. Losses by step are deterministic; seconds depend on the host's load, so compare
workdirs trained in the same minutes, e.g. alternately or side by side.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpt2jax.metrics import read_metrics  # noqa: E402


def evaluations(workdir: Path) -> list[dict]:
  return [r for r in read_metrics(workdir) if "val_loss" in r]


def first_reaching(evals: list[dict], target: float) -> dict | None:
  return next((r for r in evals if r["val_loss"] <= target), None)


def race(workdirs: list[Path]) -> list[str]:
  runs = {w: evaluations(w) for w in workdirs}
  reference = runs[workdirs[0]][-1]
  target = reference["val_loss"]
  lines = [f"target: {workdirs[0]}'s final val loss {target:.4f} at step {reference['step']} "
           f"({reference.get('elapsed_seconds', 0.0):.1f} s)",
           "| run | final val | best val | steps to target | seconds to target | s/step |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for workdir, evals in runs.items():
    last, best = evals[-1], min(r["val_loss"] for r in evals)
    hit = first_reaching(evals, target)
    per_step = last.get("elapsed_seconds", 0.0) / max(last["step"], 1)
    reached = (f"{hit['step']} | {hit.get('elapsed_seconds', 0.0):.1f}" if hit else "not reached | -")
    lines.append(f"| {workdir.name} | {last['val_loss']:.4f} | {best:.4f} | {reached} | "
                 f"{per_step:.3f} |")
  return lines


def catch_up(workdirs: list[Path]) -> list[str]:
  """For each evaluation of the reference: the step at which each other run first matches it."""
  runs = {w: evaluations(w) for w in workdirs}
  lines = ["| reference step | val loss | " + " | ".join(w.name for w in workdirs[1:]) + " |",
           "| ---: | ---: |" + " ---: |" * (len(workdirs) - 1)]
  for reference in runs[workdirs[0]][1:]:
    hits = [first_reaching(runs[w], reference["val_loss"]) for w in workdirs[1:]]
    lines.append(f"| {reference['step']} | {reference['val_loss']:.4f} | " + " | ".join(
        f"{hit['step']} ({hit.get('elapsed_seconds', 0.0):.0f} s)" if hit else "-" for hit in hits) + " |")
  return lines


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise SystemExit("usage: python -m benchmarks.optimizer_race REFERENCE_WORKDIR WORKDIR...")
  workdirs = [Path(a) for a in argv[1:]]
  print("\n".join(race(workdirs) + [""] + catch_up(workdirs)))


if __name__ == "__main__":
  main(sys.argv)
