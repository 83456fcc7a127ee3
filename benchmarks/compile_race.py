"""A cold start's tracing and compilation, program by program, for several checkouts in
alternating fresh processes: what a change to the traced programs saves at start-up.

  python -m benchmarks.compile_race --checkouts=../before,. --rounds=5
  python -m benchmarks.compile_race --config=configs/hebrew.py --vocab_size=4000

Each round runs, for every checkout in turn (the order reversed every round), one process
that imports that checkout's gpt2jax and, with the compilation cache off, one program after
another on the config's mesh, as train.py makes them (steps.make_sharded_steps):

  imports          jax, gpt2jax and its dependencies
  setup            make_sharded_steps: the optimizer, the abstract state (the model traced
                   for its shapes), shardings, the jitted steps
  train lower      the train step traced and lowered to StableHLO
  train compile    XLA's compilation of it
  eval lower       the evaluation step, likewise
  eval compile
  init             the initial state: traced, compiled and run

one after another on one thread, so each phase is measured alone (train.py overlaps them on
background threads). Prints each checkout's median seconds per phase, wall and CPU (the
process's user + system time, XLA's threads included), and writes
benchmarks/results/compile-race-<time>-<host>.json. A CHECKOUT is a gpt2jax checkout (`.`
this one, or a `git worktree add DIR COMMIT` of another).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

REPO = Path(__file__).resolve().parent.parent
PHASES = ("imports", "setup", "train lower", "train compile", "eval lower", "eval compile",
          "init")


def measure_phases(config_path: str, vocab_size: int) -> dict[str, dict[str, float]]:
  """In this process (the checkout's gpt2jax on sys.path): {phase: {"wall", "cpu"}}."""
  seconds = {}
  clock = [time.perf_counter(), time.process_time()]

  def done(phase: str) -> None:
    now = [time.perf_counter(), time.process_time()]
    seconds[phase] = {"wall": now[0] - clock[0], "cpu": now[1] - clock[1]}
    clock[:] = now

  import dataclasses
  import importlib.util

  import jax

  from gpt2jax import parallel, steps
  from gpt2jax.model import GPT
  done("imports")
  spec = importlib.util.spec_from_file_location("benchmark_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.vocab_size = vocab_size
  mesh = parallel.make_mesh(config.mesh)
  model = GPT(dataclasses.replace(steps.validate_config(config, mesh), vocab_size=vocab_size))
  sharded = steps.make_sharded_steps(config, model, mesh)
  batch = sharded.abstract_batch(config.train.batch_size, config.model.block_size)
  done("setup")
  with jax.set_mesh(mesh):
    lowered = sharded.train_step.lower(sharded.abstract_state, batch)
    done("train lower")
    lowered.compile()
    done("train compile")
    lowered = sharded.eval_step.lower(sharded.abstract_state.params, batch)
    done("eval lower")
    lowered.compile()
    done("eval compile")
  jax.block_until_ready(sharded.init(config.seed))
  done("init")
  return seconds


def run_checkout(checkout: Path, config_path: str, vocab_size: int) -> dict:
  """measure_phases in a fresh process that imports `checkout`'s gpt2jax."""
  env = {**os.environ, "GPT2JAX_COMPILATION_CACHE": "off", "PYTHONPATH": str(checkout)}
  child = subprocess.run(
      [sys.executable, __file__, "--child", str(Path(config_path).resolve()), str(vocab_size)],
      cwd=checkout, env=env, capture_output=True, text=True, check=False)
  if child.returncode != 0:
    raise RuntimeError(f"{checkout}: the measuring process failed:\n{child.stderr[-3000:]}")
  measured = json.loads(child.stdout.strip().splitlines()[-1])
  if not Path(measured["gpt2jax"]).resolve().is_relative_to(checkout):
    raise RuntimeError(f"the process for {checkout} imported {measured['gpt2jax']}")
  return measured["phases"]


def checkout_path(name: str) -> Path:
  path = (REPO if name == "." else Path(name)).resolve()
  if not (path / "gpt2jax" / "steps.py").is_file():
    raise ValueError(f"--checkouts: {path} is not a gpt2jax checkout (no gpt2jax/steps.py); "
                     "make one with `git worktree add DIR COMMIT`.")
  return path


def summarize(runs: list[list[dict]]) -> list[dict[str, dict[str, float]]]:
  """Per checkout, {phase: {"wall", "cpu"}}: medians over its rounds; "total" sums the phases."""
  summary = []
  for rounds in runs:
    phases = {phase: {kind: statistics.median(r[phase][kind] for r in rounds)
                      for kind in ("wall", "cpu")} for phase in PHASES}
    phases["total"] = {kind: statistics.median(sum(r[p][kind] for p in PHASES) for r in rounds)
                       for kind in ("wall", "cpu")}
    summary.append(phases)
  return summary


def table(names: list[str], summary: list[dict]) -> str:
  lines = ["| phase | " + " | ".join(f"{n}: wall (CPU) s" for n in names) + " |",
           "| --- |" + " ---: |" * len(names)]
  for phase in (*PHASES, "total"):
    cells = [f"{s[phase]['wall']:.2f} ({s[phase]['cpu']:.2f})" for s in summary]
    lines.append(f"| {phase} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  from benchmarks import results  # here: a measuring process imports no module of this repo
  given = flags.FLAGS
  try:
    checkouts = [checkout_path(name) for name in given.checkouts]
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  names = [str(path) if path != REPO else "." for path in checkouts]
  runs = [[] for _ in checkouts]  # per checkout, one dict of phases per round
  load_before = results.load_1min()
  for r in range(given.rounds):
    order = list(enumerate(checkouts))
    for i, path in (order if r % 2 == 0 else order[::-1]):
      runs[i].append(run_checkout(path, given.config, given.vocab_size))
  summary = summarize(runs)
  print(f"{given.config}, vocab {given.vocab_size}, {given.rounds} rounds, "
        f"load {load_before} -> {results.load_1min()}")
  print(table(names, summary))
  path = results.write({"machine": results.machine(), "config": given.config,
                        "vocab_size": given.vocab_size, "rounds": given.rounds,
                        "checkouts": [{"checkout": name, "medians": medians, "rounds": rounds}
                                      for name, medians, rounds in zip(names, summary, runs)]},
                       given.out, "compile-race")
  print(f"wrote {path}")


def _define_flags() -> None:
  flags.DEFINE_list("checkouts", ["."], "gpt2jax checkouts to compare, the first the baseline.")
  flags.DEFINE_string("config", str(REPO / "configs" / "shakespeare_char_cpu.py"),
                      "The config whose programs are compiled.")
  flags.DEFINE_integer("vocab_size", 65, "The model's vocabulary (65: Tiny Shakespeare's "
                       "characters).")
  flags.DEFINE_integer("rounds", 3, "Processes per checkout.")
  flags.DEFINE_string("out", str(REPO / "benchmarks" / "results"), "Where the JSON goes.")


if __name__ == "__main__":
  if sys.argv[1:2] == ["--child"]:  # a measuring process: its checkout is on PYTHONPATH
    phases = measure_phases(sys.argv[2], int(sys.argv[3]))
    print(json.dumps({"gpt2jax": sys.modules["gpt2jax"].__file__, "phases": phases}))
  else:
    sys.path.insert(0, str(REPO))
    _define_flags()
    app.run(main)
