"""Where the wall time of a whole `python train.py ...` command goes, outside and inside the steps.

  python -m benchmarks.command_profile --text=input.txt            # the CPU recipe, cold + warm
  python -m benchmarks.command_profile --text=input.txt --config=configs/hebrew.py --nowarm

Runs train.py through benchmarks/train_with_import_mark.py (train.py itself, plus one stdout
line once its imports are done) on a fresh compilation cache (cold), then again on the same
cache with a fresh workdir (warm), stamps every output line with the seconds since the
process started, and charges the wall time to phases from those stamps and the run's
metrics.jsonl (tokens/s of each logged interval gives the time spent in training steps):

  imports            process start to the import mark (Python, jax, gpt2jax)
  setup              config, data (tokenizer, encoding, split), model init, checkpoint manager:
                     to the "model: ..." line
  step-0 evaluation  to the "step 0: train ..., val ..." line (its compilation included)
  train-step compile to the "train step compiled in" line (a cache load when warm)
  training steps     the logged intervals' step time (steps, batch placement, log syncs)
  evaluations        each from the step's log line to its "step N: train ..., val" line
  checkpoint saves   after each evaluation line to the next log line, minus that interval's
                     step time (the finiteness check and the blocking part of the save;
                     the asynchronous part overlaps the next steps)
  final save         the last evaluation line to "trained to step" (waits for all saves)
  final report       "trained to step" to the process's exit (summary.json, loss plot)
  other              what none of the above covers

Missing lines (another config, another version of the loop) leave their phase out. Prints a
table and writes benchmarks/results/command-profile-<time>-<host>.json.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from absl import app, flags

from benchmarks import results

REPO = Path(__file__).resolve().parents[1]
IMPORT_MARK = "[benchmarks] train.py imports done"

_PROGRESS = re.compile(r"^step (\d+): loss [-\d.naif]+, lr ")
_EVALUATION = re.compile(r"^step (\d+): train ([-\d.naif]+), val ([-\d.naif]+)")
_COMPILED = re.compile(r"^train step compiled in ([\d.]+) s")
_SETUP_DONE = re.compile(r"^model: ")
_TRAINED = re.compile(r"^trained to step (\d+)")


@dataclass
class TimedRun:
  """A finished command: each output line with its seconds since the start, the wall time."""
  command: list[str]
  lines: list[tuple[float, str]] = field(default_factory=list)
  wall_seconds: float = 0.0
  returncode: int = 0
  load_before: float | None = None
  load_after: float | None = None

  def output_tail(self, n: int = 30) -> str:
    return "\n".join(text for _, text in self.lines[-n:])


def run_timestamped(command: list[str], cwd: Path, env: dict[str, str]) -> TimedRun:
  """Runs command (stdout and stderr merged, unbuffered) and stamps each line as it arrives."""
  run = TimedRun(command=command, load_before=results.load_1min())
  start = time.perf_counter()
  process = subprocess.Popen(command, cwd=cwd, env=dict(env, PYTHONUNBUFFERED="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             encoding="utf-8", errors="replace")
  for line in process.stdout:
    run.lines.append((time.perf_counter() - start, line.rstrip("\n")))
  run.returncode = process.wait()
  run.wall_seconds = time.perf_counter() - start
  run.load_after = results.load_1min()
  return run


def gpt2jax_env(compilation_cache: Path) -> dict[str, str]:
  """The caller's environment with gpt2jax's compilation cache at compilation_cache and no
  other cache settings (a test session's JAX_* cache variables would change what is cached)."""
  env = {k: v for k, v in os.environ.items()
         if k != "JAX_COMPILATION_CACHE_DIR" and not k.startswith("JAX_PERSISTENT_CACHE_")}
  env["GPT2JAX_COMPILATION_CACHE"] = str(compilation_cache)
  env["PYTHONIOENCODING"] = "utf-8"
  return env


def _first(lines: list[tuple[float, str]], pattern: re.Pattern) -> float | None:
  return next((t for t, text in lines if pattern.match(text)), None)


def _by_step(lines: list[tuple[float, str]], pattern: re.Pattern) -> dict[int, float]:
  return {int(m.group(1)): t for t, text in lines if (m := pattern.match(text))}


def interval_seconds(records: list[dict], tokens_per_step: int) -> dict[int, float]:
  """{log step: seconds of training steps since the previous log step}, from metrics.jsonl."""
  seconds, previous = {}, 0
  for record in records:
    if "tokens_per_second" not in record:
      continue
    steps = record["step"] - previous
    seconds[record["step"]] = steps * tokens_per_step / record["tokens_per_second"]
    previous = record["step"]
  return seconds


def phases(lines: list[tuple[float, str]], wall_seconds: float, records: list[dict],
           tokens_per_step: int) -> dict:
  """The wall time charged to phases (see the module docstring); seconds, None when unseen."""
  imports = _first(lines, re.compile(re.escape(IMPORT_MARK)))
  setup_done = _first(lines, _SETUP_DONE)
  evaluations = _by_step(lines, _EVALUATION)
  progress = _by_step(lines, _PROGRESS)
  compiled = _first(lines, _COMPILED)
  trained = _first(lines, _TRAINED)
  steps = interval_seconds(records, tokens_per_step)

  def between(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a

  out: dict = {"imports": imports,
               "setup": between(imports or 0.0, setup_done),
               "step0_evaluation": between(setup_done, evaluations.get(0)),
               "train_step_compile": between(evaluations.get(0), compiled)}
  compile_line = next((m for _, text in lines if (m := _COMPILED.match(text))), None)
  out["train_step_compile_reported"] = float(compile_line.group(1)) if compile_line else None
  out["training_steps"] = sum(steps.values()) if steps else None
  per_step, previous = [], 0
  for step, seconds in steps.items():
    per_step.append(seconds / (step - previous))
    previous = step
  out["steps"] = max(steps) if steps else None
  out["first_interval_ms_per_step"] = 1e3 * per_step[0] if per_step else None
  out["median_ms_per_step"] = 1e3 * statistics.median(per_step[1:]) if len(per_step) > 1 else None
  last_step = max(evaluations) if evaluations else None
  out["evaluations"] = {step: t - progress[step] for step, t in evaluations.items()
                        if step > 0 and step in progress}
  later_logs = sorted(progress)
  out["checkpoint_saves"] = {}
  for step, t in evaluations.items():
    following = next((s for s in later_logs if s > step), None)
    if step > 0 and step != last_step and following in steps:
      out["checkpoint_saves"][step] = progress[following] - t - steps[following]
  out["final_save"] = between(evaluations.get(last_step), trained) if last_step else None
  out["final_report"] = between(trained, wall_seconds)
  out["wall"] = wall_seconds
  charged = [out[k] for k in ("imports", "setup", "step0_evaluation", "train_step_compile",
                              "training_steps", "final_save", "final_report")]
  charged += list(out["evaluations"].values()) + list(out["checkpoint_saves"].values())
  out["other"] = wall_seconds - sum(s for s in charged if s is not None)
  return out


def read_records(workdir: Path) -> tuple[list[dict], int]:
  """metrics.jsonl's records and the run's tokens per step (from its config.json)."""
  config = json.loads((workdir / "config.json").read_text(encoding="utf-8"))
  tokens_per_step = config["train"]["batch_size"] * config["model"]["block_size"]
  records = [json.loads(line) for line in
             (workdir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
  return records, tokens_per_step


def profile_run(run: TimedRun, workdir: Path) -> dict:
  records, tokens_per_step = read_records(workdir)
  return phases(run.lines, run.wall_seconds, records, tokens_per_step)


def table(profile: dict) -> list[str]:
  """Markdown rows: phase | seconds | share of the wall time."""
  wall = profile["wall"]
  rows = ["| phase | seconds | share |", "| --- | ---: | ---: |"]

  def row(name: str, seconds: float | None):
    if seconds is not None:
      rows.append(f"| {name} | {seconds:.2f} | {100 * seconds / wall:.1f}% |")

  row("imports (process start to import mark)", profile["imports"])
  row("setup: config, data, model init" if profile["imports"] is not None
      else "start-up: imports, config, data, model init", profile["setup"])
  row("step-0 evaluation (with its compilation)", profile["step0_evaluation"])
  reported = profile["train_step_compile_reported"]
  row("train-step compile" + (f" (reports {reported:.1f} s)" if reported is not None else ""),
      profile["train_step_compile"])
  if profile["training_steps"] is not None:
    row(f"training steps ({profile['steps']}; median "
        f"{profile['median_ms_per_step'] or profile['first_interval_ms_per_step']:.1f} ms/step)",
        profile["training_steps"])
  evaluations = profile["evaluations"]
  if evaluations:
    row(f"{len(evaluations)} evaluations (each "
        f"{min(evaluations.values()):.2f}-{max(evaluations.values()):.2f} s)",
        sum(evaluations.values()))
  saves = profile["checkpoint_saves"]
  if saves:
    row(f"{len(saves)} checkpoint saves, blocking part (each "
        f"{min(saves.values()):.2f}-{max(saves.values()):.2f} s)", sum(saves.values()))
  row("final save and wait for all saves", profile["final_save"])
  row("final report (summary, plot) and exit", profile["final_report"])
  row("other", profile["other"])
  rows.append(f"| wall time | {wall:.2f} | 100% |")
  return rows


def profile_command(train_args: list[str], tmp: Path, cache: Path, name: str) -> dict:
  """One train.py run (through the import mark) in a fresh workdir tmp/name; -> its profile."""
  workdir = tmp / name
  command = [sys.executable, str(REPO / "benchmarks" / "train_with_import_mark.py"),
             *train_args, f"--workdir={workdir}"]
  run = run_timestamped(command, REPO, gpt2jax_env(cache))
  if run.returncode:
    raise SystemExit(f"{' '.join(command)} failed (exit {run.returncode}):\n{run.output_tail()}")
  return {"load_before": run.load_before, "load_after": run.load_after,
          **profile_run(run, workdir)}


def _define_flags() -> None:
  """Only when run as a program: benchmarks.nanogpt_race imports this module with flags of
  its own."""
  flags.DEFINE_string("text", None, "The training text (--config.data.path).")
  flags.DEFINE_string("config", "configs/shakespeare_char_cpu.py", "train.py's --config.")
  flags.DEFINE_bool("warm", True, "Also run again on the now warm compilation cache.")
  flags.DEFINE_multi_string("override", [], "More train.py flags, e.g. "
                            "--override=--config.train.num_steps=200")
  flags.DEFINE_string("out", str(REPO / "benchmarks" / "results"), "Where the JSON goes.")


def main(argv):
  del argv
  given = flags.FLAGS
  if not given.text:
    raise app.UsageError("--text=<a text file> is required (the recipe's training text).")
  train_args = [f"--config={given.config}", f"--config.data.path={Path(given.text).resolve()}",
                *given.override]
  report = {"machine": results.machine(),
            "command": "python train.py " + " ".join(train_args) + " --workdir=<fresh>",
            "runs": {}}
  with tempfile.TemporaryDirectory(prefix="command-profile-") as tmp:
    cache = Path(tmp) / "xla"  # fresh and empty: the first run compiles everything
    for name in ("cold", "warm") if given.warm else ("cold",):
      profile = profile_command(train_args, Path(tmp), cache, name)
      report["runs"][name] = profile
      print(f"\n{name} compilation cache (load {profile['load_before']} -> "
            f"{profile['load_after']}):\n" + "\n".join(table(profile)), flush=True)
  print(f"wrote {results.write(report, given.out, 'command-profile')}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
