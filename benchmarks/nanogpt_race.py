"""nanoGPT's CPU recipe end to end, gpt2jax against nanoGPT itself, interleaved on one host.

  python -m benchmarks.nanogpt_race --text=input.txt --nanogpt_dir=../nanoGPT \\
      --torch_python=../torchenv/bin/python --rounds=2
  python -m benchmarks.nanogpt_race --text=input.txt --gpt2jax_only --steps=16   # a smoke run

Each round runs, one after the other (odd rounds gpt2jax first, even rounds nanoGPT first):
  gpt2jax cold  python train.py --config=configs/shakespeare_char_cpu.py
                    --config.data.path=<text> --workdir=<fresh>
                with GPT2JAX_COMPILATION_CACHE=<a fresh, empty directory>;
  gpt2jax warm  the same command right after, on that cache, in a fresh workdir;
  nanoGPT       python train.py config/train_shakespeare_char.py --device=cpu --compile=False
                    --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
                    --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
                    --lr_decay_iters=2000 --dropout=0.0
                (the command of nanoGPT's README for a CPU), run with --torch_python (a Python
                with torch and numpy; torch is not a gpt2jax requirement) in a copy of
                --nanogpt_dir, with OMP_NUM_THREADS=--torch_threads (2: torch's default on a
                2-core machine, set explicitly so that the comparison does not depend on it).
It records each command's wall time (process start to exit), the validation loss each prints
at its last step, the 1-minute load average before and after, and for gpt2jax the
whole-command breakdown of benchmarks.command_profile (from its output's time stamps).

Data: nanoGPT's data/shakespeare_char/prepare.py would download input.txt; instead --text is
copied into the copy of --nanogpt_dir and prepare.py run there once per benchmark run (it
imports requests and numpy), outside the timed commands. gpt2jax's own data preparation
(tokenizer, encoding) happens inside its command, in every run, as it does for a user.

--steps=S (a multiple of 8) scales the recipe for smoke runs: S steps, learning-rate decay
over S, warmup S/20 and an evaluation (and gpt2jax checkpoint) every S/8 steps on both sides;
at 2000 the commands are exactly those above. Prints a table with the ratios
gpt2jax / nanoGPT of each round and writes benchmarks/results/nanogpt-race-<time>-<host>.json
(rewritten after each round).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

from benchmarks import command_profile, results

REPO = Path(__file__).resolve().parents[1]
RECIPE_STEPS = 2000
RECIPE_EVAL_EVERY = 250
RECIPE_WARMUP = 100

_NANOGPT_EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
_GPT2JAX_EVAL = re.compile(r"^step (\d+): train ([\d.]+), val ([\d.]+)")


def schedule(steps: int) -> dict:
  """The recipe's schedule scaled to `steps`: {steps, eval_every, warmup}."""
  if steps <= 0 or steps % 8:
    raise app.UsageError(f"--steps={steps}: give a positive multiple of 8 (the recipe "
                         "evaluates 8 times, every steps/8).")
  return {"steps": steps, "eval_every": steps * RECIPE_EVAL_EVERY // RECIPE_STEPS,
          "warmup": max(1, steps * RECIPE_WARMUP // RECIPE_STEPS)}


def gpt2jax_args(text: Path, steps: int, dropout: float = 0.0) -> list[str]:
  args = ["--config=configs/shakespeare_char_cpu.py", f"--config.data.path={text}"]
  if dropout:  # the recipe trains without; --dropout races the same recipe with it
    args.append(f"--config.model.dropout={dropout}")
  if steps != RECIPE_STEPS:
    s = schedule(steps)
    args += [f"--config.train.num_steps={steps}", f"--config.train.decay_steps={steps}",
             f"--config.train.eval_every={s['eval_every']}",
             f"--config.train.checkpoint_every={s['eval_every']}",
             f"--config.train.warmup_steps={s['warmup']}"]
  return args


def nanogpt_args(steps: int, dropout: float = 0.0) -> list[str]:
  args = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
          "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12",
          "--n_layer=4", "--n_head=4", "--n_embd=128", f"--max_iters={steps}",
          f"--lr_decay_iters={steps}", f"--dropout={float(dropout)}"]
  if steps != RECIPE_STEPS:
    s = schedule(steps)
    args += [f"--eval_interval={s['eval_every']}", f"--warmup_iters={s['warmup']}"]
  return args


def final_val_loss(lines: list[tuple[float, str]], pattern: re.Pattern, steps: int) -> float:
  """The validation loss a command printed at step `steps`."""
  losses = {int(m.group(1)): float(m.group(3)) for _, text in lines if (m := pattern.match(text))}
  if steps not in losses:
    raise RuntimeError(f"no validation loss printed at step {steps} (seen at steps "
                       f"{sorted(losses)})")
  return losses[steps]


def check_nanogpt(nanogpt_dir: str | None, torch_python: str | None) -> tuple[Path, str]:
  """The nanoGPT checkout and torch Python, or SystemExit naming the flags to fix."""
  if not nanogpt_dir or not torch_python:
    missing = [name for name, value in (("--nanogpt_dir", nanogpt_dir),
                                        ("--torch_python", torch_python)) if not value]
    raise SystemExit(f"error: give {' and '.join(missing)}: --nanogpt_dir=<a checkout of "
                     "github.com/karpathy/nanoGPT> and --torch_python=<a Python with torch, "
                     "numpy and requests> (or --gpt2jax_only to run gpt2jax's side alone).")
  root = Path(nanogpt_dir).expanduser().resolve()
  needed = ["train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
            "data/shakespeare_char/prepare.py"]
  absent = [name for name in needed if not (root / name).is_file()]
  if absent:
    raise SystemExit(f"error: --nanogpt_dir={nanogpt_dir} is not a nanoGPT checkout "
                     f"(no {', '.join(absent)}).")
  probe = subprocess.run([torch_python, "-c", "import torch, numpy, requests"],
                         capture_output=True, text=True)
  if probe.returncode:
    raise SystemExit(f"error: --torch_python={torch_python} cannot import torch, numpy and "
                     f"requests: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
  return root, torch_python


def torch_info(torch_python: str, env: dict[str, str]) -> dict:
  probe = subprocess.run([torch_python, "-c", "import torch; "
                          "print(torch.__version__, torch.get_num_threads())"],
                         capture_output=True, text=True, env=env, check=True)
  version, threads = probe.stdout.split()
  return {"version": version, "threads": int(threads),
          "threads_set_by": f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"}


def prepare_nanogpt(root: Path, text: Path, torch_python: str, into: Path) -> dict:
  """A copy of the nanoGPT checkout with --text as its input.txt, prepared (untimed)."""
  shutil.copytree(root, into, ignore=shutil.ignore_patterns(".git", "out*", "*.bin", "*.pkl",
                                                            "input.txt"))
  data_dir = into / "data" / "shakespeare_char"
  shutil.copyfile(text, data_dir / "input.txt")  # prepare.py downloads it only when absent
  done = subprocess.run([torch_python, "prepare.py"], cwd=data_dir, capture_output=True,
                        text=True)
  if done.returncode:
    raise SystemExit(f"error: nanoGPT's prepare.py failed:\n{done.stdout}{done.stderr}")
  return {"prepare_output": done.stdout.strip().splitlines()}


def run_gpt2jax(text: Path, steps: int, tmp: Path, name: str, cache: Path,
                dropout: float = 0.0) -> dict:
  workdir = tmp / name
  command = [sys.executable, "train.py", *gpt2jax_args(text, steps, dropout),
             f"--workdir={workdir}"]
  run = command_profile.run_timestamped(command, REPO, command_profile.gpt2jax_env(cache))
  if run.returncode:
    raise SystemExit(f"{' '.join(command)} failed (exit {run.returncode}):\n{run.output_tail()}")
  result = _summary(run, final_val_loss(run.lines, _GPT2JAX_EVAL, steps))
  result["phases"] = command_profile.profile_run(run, workdir)
  shutil.rmtree(workdir, ignore_errors=True)
  return result


def run_nanogpt(copy: Path, torch_python: str, env: dict[str, str], steps: int,
                dropout: float = 0.0) -> dict:
  shutil.rmtree(copy / "out-shakespeare-char", ignore_errors=True)  # its out_dir
  command = [torch_python, "train.py", *nanogpt_args(steps, dropout)]
  run = command_profile.run_timestamped(command, copy, env)
  if run.returncode:
    raise SystemExit(f"nanoGPT failed (exit {run.returncode}):\n{run.output_tail()}")
  return _summary(run, final_val_loss(run.lines, _NANOGPT_EVAL, steps))


def _summary(run: command_profile.TimedRun, val_loss: float) -> dict:
  return {"wall_seconds": run.wall_seconds, "val_loss": val_loss,
          "load_before": run.load_before, "load_after": run.load_after}


def race_round(number: int, text: Path, steps: int, tmp: Path, nanogpt,
               dropout: float = 0.0) -> dict:
  """One round: gpt2jax cold then warm, and nanoGPT (first on even rounds)."""
  started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  runs: dict = {}

  def gpt2jax_side():
    cache = tmp / f"xla-{number}"  # fresh and empty: the cold run compiles everything
    runs["gpt2jax_cold"] = run_gpt2jax(text, steps, tmp, f"cold-{number}", cache, dropout)
    runs["gpt2jax_warm"] = run_gpt2jax(text, steps, tmp, f"warm-{number}", cache, dropout)
    shutil.rmtree(cache, ignore_errors=True)

  def nanogpt_side():
    if nanogpt:
      runs["nanogpt"] = run_nanogpt(*nanogpt, steps, dropout)

  for side in ((gpt2jax_side, nanogpt_side) if number % 2 else (nanogpt_side, gpt2jax_side)):
    side()
  result = {"round": number, "started": started, "runs": runs}
  if "nanogpt" in runs:
    result["ratios"] = {f"{name}/nanogpt": runs[name]["wall_seconds"] /
                        runs["nanogpt"]["wall_seconds"] for name in ("gpt2jax_cold",
                                                                     "gpt2jax_warm")}
  return result


def table(rounds: list[dict]) -> list[str]:
  rows = ["| round | gpt2jax cold: wall, val | gpt2jax warm | nanoGPT | cold / nanoGPT | "
          "warm / nanoGPT | load (1 min) |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]

  def cell(run: dict | None) -> str:
    return f"{run['wall_seconds']:.1f} s, {run['val_loss']:.4f}" if run else "-"

  for r in rounds:
    runs, ratios = r["runs"], r.get("ratios", {})
    loads = [run[k] for run in runs.values() for k in ("load_before", "load_after")
             if run[k] is not None]
    rows.append(f"| {r['round']} ({r['started'][11:16]} UTC) | {cell(runs['gpt2jax_cold'])} | "
                f"{cell(runs['gpt2jax_warm'])} | {cell(runs.get('nanogpt'))} | "
                + " | ".join(f"{ratios[k]:.2f}x" if k in ratios else "-"
                             for k in ("gpt2jax_cold/nanogpt", "gpt2jax_warm/nanogpt"))
                + f" | {min(loads):.1f}-{max(loads):.1f} |")
  return rows


def _define_flags() -> None:
  """Only when run as a program, so that tests can import this module beside other
  benchmarks' flags."""
  flags.DEFINE_string("text", None, "Tiny Shakespeare (nanoGPT's input.txt).")
  flags.DEFINE_string("nanogpt_dir", None, "A checkout of karpathy/nanoGPT.")
  flags.DEFINE_string("torch_python", None,
                      "A Python with torch, numpy and requests, for nanoGPT.")
  flags.DEFINE_bool("gpt2jax_only", False, "Run gpt2jax's side only.")
  flags.DEFINE_integer("rounds", 2, "Interleaved rounds.")
  flags.DEFINE_integer("steps", RECIPE_STEPS, "Training steps (a multiple of 8); other than "
                       "2000 only for smoke runs.")
  flags.DEFINE_integer("torch_threads", 2, "OMP_NUM_THREADS for nanoGPT.")
  flags.DEFINE_float("dropout", 0.0, "Dropout on both sides (the recipe has none; nanoGPT's "
                     "Shakespeare config has 0.2).")
  flags.DEFINE_string("out", str(REPO / "benchmarks" / "results"), "Where the JSON goes.")


def main(argv):
  del argv
  given = flags.FLAGS
  if not given.text or not Path(given.text).is_file():
    raise SystemExit(f"error: --text={given.text or ''} must name the training text "
                     "(Tiny Shakespeare, nanoGPT's input.txt).")
  text = Path(given.text).resolve()
  steps = schedule(given.steps)["steps"]
  nanogpt_checked = None if given.gpt2jax_only else check_nanogpt(given.nanogpt_dir,
                                                                   given.torch_python)
  dropout = given.dropout
  report: dict = {"machine": results.machine(), "steps": steps, "dropout": dropout,
                  "rounds": [], "gpt2jax_command": "python train.py "
                  + " ".join(gpt2jax_args(text, steps, dropout))
                  + " --workdir=<fresh>  (GPT2JAX_COMPILATION_CACHE=<fresh, then warm>)"}
  with tempfile.TemporaryDirectory(prefix="nanogpt-race-") as tmp_name:
    tmp = Path(tmp_name)
    nanogpt = None
    if nanogpt_checked:
      root, torch_python = nanogpt_checked
      env = dict(os.environ, OMP_NUM_THREADS=str(given.torch_threads), PYTHONIOENCODING="utf-8")
      report["nanogpt_command"] = f"python train.py {' '.join(nanogpt_args(steps, dropout))}"
      report["nanogpt_dir"] = str(root)
      report["torch"] = torch_info(torch_python, env)
      report["nanogpt_data"] = prepare_nanogpt(root, text, torch_python, tmp / "nanoGPT")
      nanogpt = (tmp / "nanoGPT", torch_python, env)
    written = None
    for number in range(1, given.rounds + 1):
      report["rounds"].append(race_round(number, text, steps, tmp, nanogpt, dropout))
      print("\n".join(table(report["rounds"])[:2] + table(report["rounds"])[-1:]), flush=True)
      written = _write(report, given.out, written)  # a stopped race keeps its finished rounds
  print("\n" + "\n".join(table(report["rounds"])))
  print(f"wrote {written}")


def _write(report: dict, out_dir: str, path: Path | None) -> Path:
  """The report with the median ratios of the rounds so far, to path (a new file if None)."""
  ratios = [r["ratios"] for r in report["rounds"] if "ratios" in r]
  if ratios:
    report["median_ratios"] = {k: statistics.median(r[k] for r in ratios) for k in ratios[0]}
  report["machine"]["load_average_now"] = results.load_average()
  if path is None:
    return results.write(report, out_dir, "nanogpt-race")
  path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
  return path

if __name__ == "__main__":
  _define_flags()
  app.run(main)
