"""How long a training run takes to stop on SIGTERM: to the checkpoint on disk and to the exit.

  python -m benchmarks.stop_time --recipe=bilingual --tries=3
  python -m benchmarks.stop_time --recipe=hebrew --when=before_eval

Runs `train.py --config=configs/<recipe>.py` in a workdir of its own (kept between tries, so
every try after the first resumes), sends SIGTERM at a chosen moment and times the "Stopped
by" line (printed once the checkpoint is complete on disk) and the process's exit. `--when`:
`mid_interval` signals `--delay` seconds after a log line; `before_eval` signals about three
steps before the next evaluation (the step time is read from the tokens/s of the log line
that precedes it; under a changing load it can miss, which the try's report shows). Each try reports the load average at the signal, the step it stopped
after, and whether an evaluation or a sample ran after the signal (they should not).
Prints one JSON line per try and writes benchmarks/results/stop-<recipe>-<time>.json.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from absl import app, flags

from benchmarks import results

REPO = Path(__file__).resolve().parents[1]

_RECIPE = flags.DEFINE_string("recipe", "bilingual", "A recipe in configs/ (its file name).")
_WHEN = flags.DEFINE_enum("when", "mid_interval", ["mid_interval", "before_eval"],
                          "When the signal is sent.")
_DELAY = flags.DEFINE_float("delay", 20.0, "mid_interval: seconds after a log line.")
_TRIES = flags.DEFINE_integer("tries", 3, "How many runs to stop.")
_WORKDIR = flags.DEFINE_string("workdir", "", "The run's workdir (default: a temporary one).")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "More train.py flags, e.g. "
                                       "--override=--config.data.path=input.txt")
_OUT = flags.DEFINE_string("out", str(REPO / "benchmarks" / "results"),
                           "Where the JSON goes.")

_LOG_LINE = re.compile(r"^step (\d+): loss .*?([\d,]+) tokens/s")
_EVAL_LINE = re.compile(r"^step \d+: train")


def _signal_delay(line: str, config) -> float | None:
  """Seconds from this log line to the signal, or None when this line is not the trigger."""
  match = _LOG_LINE.match(line)
  if not match:
    return None
  if _WHEN.value == "mid_interval":
    return _DELAY.value
  step, tokens_per_second = int(match.group(1)), float(match.group(2).replace(",", ""))
  next_eval = (step // config.train.eval_every + 1) * config.train.eval_every
  if next_eval - step > config.train.log_every:
    return None  # another log line comes first
  step_seconds = config.train.batch_size * config.model.block_size / tokens_per_second
  return max(0.0, (next_eval - step - 3) * step_seconds)


def stop_once(workdir: Path, config) -> dict:
  command = [sys.executable, str(REPO / "train.py"),
             f"--config={REPO / 'configs' / (_RECIPE.value + '.py')}",
             f"--workdir={workdir}", *_OVERRIDES.value]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  with open(f"{workdir}.stderr", "a", encoding="utf-8") as stderr:
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=stderr, text=True, encoding="utf-8")
    signalled: dict = {}
    lines: list[tuple[float, str]] = []

    def send():
      signalled.update(time=time.monotonic(), load1=os.getloadavg()[0],
                       last_line=lines[-1][1] if lines else "")
      process.send_signal(signal.SIGTERM)

    timer, stopped_at = None, None
    for line in process.stdout:
      lines.append((time.monotonic(), line.rstrip("\n")))
      delay = _signal_delay(line, config) if timer is None else None
      if delay is not None:
        timer = threading.Timer(delay, send)
        timer.start()
      if line.startswith("Stopped by"):
        stopped_at = lines[-1][0]
    process.wait()
  exited = time.monotonic()
  if "time" not in signalled:
    return {"error": f"the run ended before the signal (exit {process.returncode})"}
  after = [text for t, text in lines if t > signalled["time"]]
  stop_line = next((text for text in after if text.startswith("Stopped by")), "")
  step = re.search(r"after step (\d+)", stop_line)
  return {
      "load1_at_signal": round(signalled["load1"], 1),
      "last_line_before_signal": signalled["last_line"][:80],
      "to_checkpoint_on_disk_s": round(stopped_at - signalled["time"], 2) if stopped_at else None,
      "to_exit_s": round(exited - signalled["time"], 2),
      "stopped_after_step": int(step.group(1)) if step else None,
      "returncode": process.returncode,
      "evaluations_after_signal": sum(bool(_EVAL_LINE.match(text)) for text in after),
      "samples_after_signal": sum(text.startswith("--- sample") for text in after),
  }


def main(argv):
  del argv
  config = importlib.import_module(f"configs.{_RECIPE.value}").get_config()
  workdir = Path(_WORKDIR.value or tempfile.mkdtemp(prefix=f"stop-{_RECIPE.value}-"))
  tries = []
  for _ in range(_TRIES.value):
    tries.append(stop_once(workdir, config))
    print(json.dumps(tries[-1]), flush=True)
  out = results.write({"machine": results.machine(), "recipe": _RECIPE.value,
                       "when": _WHEN.value, "overrides": _OVERRIDES.value, "tries": tries},
                      _OUT.value, f"stop-{_RECIPE.value}")
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
