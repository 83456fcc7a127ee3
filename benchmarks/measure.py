"""The measurements: training step throughput, sampling speed, start-up time, CPU recipe."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import command_profile, results
from configs import default
from gpt2jax import kernels, optim, runtime, sampling
from gpt2jax.flops import gpt_flops_per_token
from gpt2jax.model import GPT, GPTConfig
from gpt2jax.steps import init_train_state, make_train_step

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  n_layer: int
  n_head: int
  n_embd: int
  block_size: int
  batch_size: int
  vocab_size: int
  dropout: float = 0.0
  dtype: str = "float32"  # model.dtype: the matmuls' operand dtype

  def model_config(self) -> GPTConfig:
    return GPTConfig(vocab_size=self.vocab_size, block_size=self.block_size,
                     n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                     dropout=self.dropout, dtype=self.dtype)


SHAPES = {
    "A": Shape("A", 4, 4, 128, 128, 32, 65),
    "B": Shape("B", 6, 6, 384, 256, 16, 65),
    "Bd": Shape("Bd", 6, 6, 384, 256, 16, 65, dropout=0.2),  # as shakespeare_char trains
    "C": Shape("C", 12, 12, 768, 256, 4, 50304),
    "R": Shape("R", 4, 4, 128, 64, 12, 65),  # the nanoGPT CPU recipe's model and batch
    "H": Shape("H", 4, 4, 256, 128, 16, 4000, dropout=0.1),  # configs/hebrew.py's default
    "T": Shape("T", 1, 2, 32, 16, 2, 11),  # tiny: for tests that the benchmarks run at all
}


def machine() -> dict:
  """results.machine() and the devices and jax version this process computes with."""
  return {**results.machine(), "devices": [d.device_kind for d in jax.devices()],
          "jax": jax.__version__}


def stats(seconds: list[float]) -> dict:
  return {"median": float(np.median(seconds)), "min": float(np.min(seconds)),
          "max": float(np.max(seconds)), "count": len(seconds)}


def train_setup(shape: Shape, optimizer_name: str = "adamw"):
  """(state, the jitted and donated train step, two random batches) for a shape."""
  model = GPT(shape.model_config())
  train_config = default.get_config().train
  train_config.optimizer = optimizer_name
  optimizer = optim.make_optimizer(train_config)
  platform = jax.devices()[0].platform
  state = init_train_state(model, optimizer, seed=0, platform=platform)
  step = jax.jit(kernels.traced_for(platform, make_train_step(
      model, optimizer, optim.learning_rate_schedule(train_config), seed=0)),
                 donate_argnums=0,  # compiled as training compiles it
                 compiler_options=runtime.compiler_options(platform))
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, shape.vocab_size, (shape.batch_size,
                                                            shape.block_size + 1)), jnp.int32)
             for _ in range(2)]
  return state, step, batches


def timed_steps(state, step, batches, steps: int) -> tuple:
  """(state, seconds of each of `steps` steps), each waited for, alternating the batches."""
  times = []
  for i in range(steps):
    start = time.perf_counter()
    state, step_metrics = step(state, batches[i % 2])
    jax.block_until_ready(step_metrics)
    times.append(time.perf_counter() - start)
  return state, times


def train_throughput(shape: Shape, steps: int, peak_flops: float) -> dict:
  """Median step time of the jitted, donated training step after two warm-up steps."""
  config = shape.model_config()
  state, step, batches = train_setup(shape)
  compile_start = time.perf_counter()
  state, step_metrics = step(state, batches[0])
  jax.block_until_ready(step_metrics)
  compile_seconds = time.perf_counter() - compile_start
  state, step_metrics = step(state, batches[1])
  jax.block_until_ready(step_metrics)
  state, times = timed_steps(state, step, batches, steps)
  tokens = shape.batch_size * shape.block_size
  step_time = stats(times)
  flops = gpt_flops_per_token(config, state.params) * tokens / step_time["median"]
  return {
      "shape": dataclasses.asdict(shape),
      "step_seconds": step_time,
      "tokens_per_second": tokens / step_time["median"],
      "tokens_per_second_range": [tokens / step_time["max"], tokens / step_time["min"]],
      "gflops_per_second": flops / 1e9,
      "mfu": flops / peak_flops,
      "first_step_seconds": compile_seconds,
  }


def sampling_speed(shape: Shape, batch: int, new_tokens: int, use_cache: bool,
                   repeats: int) -> dict:
  """New tokens per second of sampling.generate with a 1-token prompt and top_k 50."""
  config = shape.model_config()
  model = GPT(config)
  params = jax.jit(model.init)(jax.random.key(0),
                               jnp.zeros((1, config.block_size), jnp.int32))["params"]
  options = sampling.SamplingOptions(max_new_tokens=new_tokens, temperature=1.0, top_k=50,
                                     stop_at_eos=False)
  prompts = [[0]] * batch

  def run(seed):
    start = time.perf_counter()
    out = sampling.generate(model, params, prompts, options, eos_id=0, pad_id=0, seed=seed,
                            use_cache=use_cache)
    elapsed = time.perf_counter() - start
    assert all(len(o) == new_tokens for o in out), "generation stopped early"
    return elapsed

  first = run(0)  # compiles
  times = [run(seed) for seed in range(1, repeats + 1)]
  t = stats(times)
  return {
      "shape": shape.name, "batch": batch, "new_tokens": new_tokens, "use_cache": use_cache,
      "seconds": t, "first_call_seconds": first,
      "tokens_per_second": batch * new_tokens / t["median"],
      "tokens_per_second_per_sequence": new_tokens / t["median"],
  }


def synthetic_corpus(path: Path, characters: int = 1_000_000, vocab: int = 65) -> Path:
  """A text file of `vocab` distinct characters (as Tiny Shakespeare has 65)."""
  alphabet = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'-\n&$3"))
  assert len(alphabet) == vocab
  rng = np.random.default_rng(0)
  path.write_text("".join(alphabet[rng.integers(0, vocab, characters)]), encoding="utf-8")
  return path


def _run_command(args: list[str], cwd: Path, *, compilation_cache: Path,
                 until: str | None = None) -> tuple[float | None, str, float]:
  """Runs a command; returns (seconds until a stdout line matched `until`, output, total).

  compilation_cache: the command's compilation cache directory (a fresh one: nothing cached),
  used in place of any the caller's environment names.
  """
  run = command_profile.run_timestamped(args, cwd, command_profile.gpt2jax_env(compilation_cache))
  if run.returncode:
    raise RuntimeError(f"{' '.join(args)} failed:\n{run.output_tail()}")
  matched = next((seconds for seconds, text in run.lines if until and re.search(until, text)),
                 None)
  return matched, "\n".join(text for _, text in run.lines), run.wall_seconds


def startup_time(shape: Shape, corpus: Path) -> dict:
  """Seconds from `python train.py` (config B shape) to the first completed training step:
  imports, data preparation, initialisation, compilation and a step-0 evaluation of one batch
  per split (the default 20 batches per split would add the time of 40 forward passes, which
  says nothing about start-up). A fresh workdir each time, so nothing is resumed; run twice
  on one new compilation cache: cold (everything compiles) and warm (a second run of the
  same shapes, which loads the compiled steps from the cache)."""
  with tempfile.TemporaryDirectory() as tmp:
    result = {"shape": shape.name}
    for run in ("cold", "warm"):
      args = [sys.executable, str(REPO / "train.py"), "--config=configs/shakespeare_char.py",
              f"--config.data.path={corpus}", f"--workdir={tmp}/{run}",
              f"--config.model.n_layer={shape.n_layer}", f"--config.model.n_head={shape.n_head}",
              f"--config.model.n_embd={shape.n_embd}",
              f"--config.model.block_size={shape.block_size}", "--config.model.dropout=0.0",
              "--config.model.bias=True",
              f"--config.train.batch_size={shape.batch_size}", "--config.train.num_steps=2",
              "--config.train.log_every=1", "--config.train.eval_every=1000",
              "--config.train.eval_batches=1",
              "--config.train.warmup_steps=1", "--config.train.checkpoint_every=1000"]
      seconds, _, total = _run_command(args, REPO, until=r"^step 1: loss",
                                       compilation_cache=Path(tmp) / "xla")
      result[f"seconds_to_first_step_{run}"] = seconds
      result[f"command_seconds_{run}"] = total
  result["command"] = " ".join(args[1:]).replace(f"{tmp}/warm", "<workdir>")
  return result


def cpu_recipe(corpus: Path) -> dict:
  """nanoGPT's README CPU recipe (configs/shakespeare_char_cpu.py): wall time (nothing
  compiled beforehand) and val loss."""
  with tempfile.TemporaryDirectory() as workdir:
    args = [sys.executable, str(REPO / "train.py"), "--config=configs/shakespeare_char_cpu.py",
            f"--config.data.path={corpus}", f"--workdir={workdir}/run"]
    # A fresh compilation cache: the wall time includes every compilation.
    _, output, total = _run_command(args, REPO, compilation_cache=Path(workdir) / "xla")
    records = [json.loads(line) for line in
               (Path(workdir) / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
  evals = [r for r in records if "val_loss" in r]
  return {"wall_seconds": total, "final_step": evals[-1]["step"],
          "val_loss": evals[-1]["val_loss"], "train_loss": evals[-1].get("eval_train_loss"),
          "evaluations": [(r["step"], r["val_loss"]) for r in evals],
          "command": " ".join(args[1:])}
