"""Benchmarks: training throughput and MFU (shapes A, B, C, and Bd: B with dropout 0.2),
sampling speed, start-up time and nanoGPT's CPU recipe. Prints a table and writes
benchmarks/results/<time>-<host>.json.

  python -m benchmarks.run                       # everything but the CPU recipe
  python -m benchmarks.run --recipe_corpus=input.txt   # also nanoGPT's CPU recipe
  python -m benchmarks.run --only=train --shapes=A,B
  python -m benchmarks.run --only=train --shapes=R,H --dtypes=float32,bfloat16 --rounds=3
  python -m benchmarks.run --only=train,sample --shapes=T --sample_shape=T   # runs at all?

Timings on shared machines are noisy: compare numbers from one run, and look at min-max.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
import tempfile
from pathlib import Path

from absl import app, flags, logging

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gpt2jax  # noqa: E402,F401  (process settings first)
import jax  # noqa: E402

from benchmarks import measure, peak  # noqa: E402
from benchmarks import results as results_lib  # noqa: E402

_ONLY = flags.DEFINE_list("only", ["train", "sample", "startup", "recipe"],
                          "Which benchmarks: train, sample, startup, recipe.")
_SHAPES = flags.DEFINE_list("shapes", ["A", "B", "Bd", "C"], "Training shapes to measure.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32"], "model.dtype of the training shapes: each "
                            "shape is measured with each, one after the other.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Times the training measurements run, in turn "
                               "(interleaved, so that the host's changing speed hits all alike).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed training steps per shape (after warm-up).")
_SAMPLE_REPEATS = flags.DEFINE_integer("sample_repeats", 3, "Timed generate() calls each.")
_SAMPLE_SHAPE = flags.DEFINE_enum("sample_shape", "B", list(measure.SHAPES),
                                  "The model shape that samples.")
_SAMPLE_TOKENS = flags.DEFINE_integer("sample_tokens", 256, "New tokens per sampling call.")
_NO_CACHE_BATCHES = flags.DEFINE_list("no_cache_batches", ["1"],
                                      "Batch sizes for the (slow) no-cache sampling mode.")
_RECIPE_CORPUS = flags.DEFINE_string(
    "recipe_corpus", None, "Tiny Shakespeare (input.txt) for nanoGPT's CPU recipe; "
    "the recipe is skipped without it.")
_OUT = flags.DEFINE_string("out", str(REPO / "benchmarks" / "results"), "Where the JSON goes.")


def _row(name, value, spread="", note=""):
  print(f"| {name:<44} | {value:>16} | {spread:>22} | {note}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  results = {"machine": measure.machine(),
             "started": datetime.datetime.now().isoformat(timespec="seconds")}
  device_peak = peak.device_peak()
  results["peak"] = {"flops_per_second": device_peak.flops_per_second,
                     "source": device_peak.source}
  print(f"machine: {results['machine']['cpu']} x{results['machine']['cores']}, "
        f"{results['machine']['devices'][0]}, jax {jax.__version__}; "
        f"load average {results['machine']['load_average']}")
  print(f"peak for MFU: {device_peak.source}\n")
  print(f"| {'benchmark':<44} | {'value':>16} | {'median [min-max]':>22} | note")
  print(f"|{'-' * 46}|{'-' * 18}|{'-' * 24}|------")
  if "train" in _ONLY.value:
    results["train"] = []
    runs = [(name, dtype) for _ in range(_ROUNDS.value) for name in _SHAPES.value
            for dtype in _DTYPES.value]
    for name, dtype in runs:
      shape = dataclasses.replace(measure.SHAPES[name], dtype=dtype)
      r = measure.train_throughput(shape, _STEPS.value, device_peak.flops_per_second)
      results["train"].append(r)
      s = r["step_seconds"]
      label = name if dtype == "float32" else f"{name} {dtype}"
      _row(f"train {label}: tokens/s", f"{r['tokens_per_second']:,.0f}",
           f"{s['median'] * 1e3:.1f} [{s['min'] * 1e3:.1f}-{s['max'] * 1e3:.1f}] ms",
           f"{r['gflops_per_second']:.0f} GFLOP/s, MFU {r['mfu']:.0%}")
  if "sample" in _ONLY.value:
    results["sample"] = []
    cases = [(b, True) for b in (1, 16)] + [(int(b), False) for b in _NO_CACHE_BATCHES.value]
    for batch, use_cache in cases:
      r = measure.sampling_speed(measure.SHAPES[_SAMPLE_SHAPE.value], batch,
                                 _SAMPLE_TOKENS.value, use_cache, _SAMPLE_REPEATS.value)
      results["sample"].append(r)
      s = r["seconds"]
      _row(f"sample {r['shape']}, batch {batch}, {'KV cache' if use_cache else 'no cache'}: "
           "tokens/s", f"{r['tokens_per_second']:,.0f}",
           f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}] s",
           f"{r['new_tokens']} new tokens, top_k 50; first call {r['first_call_seconds']:.1f} s")
  if "startup" in _ONLY.value:
    with tempfile.TemporaryDirectory() as tmp:
      corpus = measure.synthetic_corpus(Path(tmp) / "corpus.txt")
      r = measure.startup_time(measure.SHAPES["B"], corpus)
    results["startup"] = r
    _row("train.py B: command start to first step", f"{r['seconds_to_first_step_cold']:.1f} s",
         "", "imports, data, init, step-0 eval, compile")
    _row("  the same, compiled steps in the cache", f"{r['seconds_to_first_step_warm']:.1f} s",
         "", "a second run of the same shapes")
  if "recipe" in _ONLY.value and _RECIPE_CORPUS.value:
    r = measure.cpu_recipe(Path(_RECIPE_CORPUS.value).resolve())
    results["recipe"] = r
    _row("nanoGPT CPU recipe: wall time (2000 steps)", f"{r['wall_seconds']:.1f} s", "",
         f"val loss {r['val_loss']:.4f} at step {r['final_step']}")
  results["machine"]["load_average_after"] = results_lib.load_average()
  path = results_lib.write(results, _OUT.value)
  print(f"\nload average after: {results['machine']['load_average_after']}; wrote {path}")


if __name__ == "__main__":
  app.run(main)
