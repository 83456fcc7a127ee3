"""Training: the train state, pure train/eval steps, and the loop around them."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gpt2jax import checkpoint as ckpt
from gpt2jax import errors, metrics, optim, sampling
from gpt2jax.data import batches as batches_lib
from gpt2jax.data.pipeline import PreparedData, prepare_data
from gpt2jax.model import GPT, GPTConfig, count_params


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: number of updates applied
  params: Any
  opt_state: Any


def init_train_state(model: GPT, optimizer: optax.GradientTransformation, seed: int
                     ) -> TrainState:
  def init(key):
    params = model.init(key, jnp.zeros((1, model.config.block_size), jnp.int32))["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

  return jax.jit(init)(jax.random.key(seed))


def cross_entropy(logits, targets):
  """Mean next-token loss in nats, computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets).mean()


def make_train_step(model: GPT, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, seed: int) -> Callable:
  """train_step(state, batch [B, T+1] int32) -> (state, metrics); pure, ready for jit."""
  dropout_key = jax.random.key(seed + 1)

  def train_step(state: TrainState, batch):
    inputs, targets = batch[:, :-1], batch[:, 1:]
    rng = jax.random.fold_in(dropout_key, state.step)  # the same dropout on resume

    def loss_fn(params):
      logits, _ = model.apply({"params": params}, inputs, deterministic=False,
                              rngs={"dropout": rng})
      return cross_entropy(logits, targets)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                    "learning_rate": schedule(state.step)}
    return TrainState(state.step + 1, params, opt_state), step_metrics

  return train_step


def make_eval_step(model: GPT) -> Callable:
  """eval_step(params, batch) -> mean loss, without dropout."""

  def eval_step(params, batch):
    logits, _ = model.apply({"params": params}, batch[:, :-1])
    return cross_entropy(logits, batch[:, 1:])

  return eval_step


def validate_config(config: ml_collections.ConfigDict) -> None:
  t = config.train
  for key in ("batch_size", "num_steps", "eval_every", "eval_batches", "checkpoint_every",
              "log_every", "keep_checkpoints"):
    if t[key] < 1:
      raise errors.UserError(f"train.{key} must be at least 1, got {t[key]}.")
  if t.learning_rate <= 0:
    raise errors.UserError(f"train.learning_rate must be positive, got {t.learning_rate}.")


@dataclasses.dataclass
class Run:
  """Everything the loop needs, built once from (config, workdir)."""

  config: ml_collections.ConfigDict
  workdir: Path
  data: PreparedData
  model: GPT
  checkpoints: ckpt.Checkpoints
  state: TrainState
  start_step: int
  train_step: Callable
  eval_step: Callable
  is_writer: bool


def _check_workdir(config, workdir: Path, checkpoints: ckpt.Checkpoints) -> None:
  """A workdir with checkpoints may only be resumed by a config of the same shape."""
  if not (workdir / ckpt.CONFIG_JSON).exists() or checkpoints.latest_step() is None:
    return
  diffs = ckpt.shape_differences(ckpt.load_config(workdir), config)
  if diffs:
    raise errors.UserError(
        f"{workdir} holds checkpoints of a differently shaped model ({'; '.join(diffs)}). "
        "Use a new --workdir, or the same settings to resume."
    )


def setup_run(config: ml_collections.ConfigDict, workdir: str | Path) -> Run:
  validate_config(config)
  workdir = Path(workdir)
  is_writer = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoints = ckpt.Checkpoints(workdir, keep=config.train.keep_checkpoints)
  _check_workdir(config, workdir, checkpoints)
  data = prepare_data(config, workdir, reuse_tokenizer=checkpoints.latest_step() is not None)
  model_config = GPTConfig.from_config(config.model, data.tokenizer.vocab_size)
  model = GPT(model_config)
  if is_writer:
    ckpt.save_config(workdir, config)

  optimizer = optim.make_optimizer(config.train)
  schedule = optim.learning_rate_schedule(config.train)
  state = init_train_state(model, optimizer, config.seed)
  start_step = checkpoints.latest_step() or 0
  if start_step:
    state, _ = checkpoints.restore(start_step, jax.eval_shape(lambda: state))

  train_step = jax.jit(make_train_step(model, optimizer, schedule, config.seed),
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model))
  return Run(config, workdir, data, model, checkpoints, state, start_step, train_step,
             eval_step, is_writer)


def evaluate(run: Run, params, windows: list[np.ndarray]) -> float:
  losses = [run.eval_step(params, jnp.asarray(batch)) for batch in windows]
  return float(np.mean(jax.device_get(losses)))


def generate_sample(run: Run, params, step: int) -> str:
  t = run.config.train
  tokenizer = run.data.tokenizer
  prompt = tokenizer.encode(t.sample_prompt) if t.sample_prompt else []
  options = sampling.SamplingOptions(max_new_tokens=t.sample_tokens,
                                     temperature=t.sample_temperature, top_k=t.sample_top_k)
  new = sampling.generate(run.model, params, [[tokenizer.eos_id] + prompt], options,
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=step)[0]
  return t.sample_prompt + tokenizer.decode(new)


def _startup_report(run: Run, console: metrics.Console) -> None:
  data, cfg = run.data, run.model.config
  console.print(
      f"corpus {run.config.data.corpus!r}: {data.num_documents:,} documents, "
      f"{data.num_characters:,} characters; {data.tokenizer.kind} tokenizer "
      f"({'trained' if data.trained_tokenizer else 'loaded'}), vocabulary "
      f"{data.tokenizer.vocab_size:,}; tokens train {len(data.train.tokens):,} / val "
      f"{len(data.val.tokens):,} ({data.val.bytes_per_token:.2f} bytes per token)")
  console.print(
      f"model: {cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}, block "
      f"{cfg.block_size}, {count_params(run.state.params):,} parameters, {cfg.dtype}; "
      + (f"resuming from step {run.start_step}" if run.start_step else "starting from scratch"))


class _Interval:
  """Accumulates per-step metrics on device; reads them only when a log line is due."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.step_metrics: list[dict] = []
    self.started = time.perf_counter()

  def summary(self, tokens_per_step: int) -> dict:
    host = jax.device_get(self.step_metrics)
    seconds = time.perf_counter() - self.started
    return {
        "train_loss": float(np.mean([m["loss"] for m in host])),
        "grad_norm": float(np.mean([m["grad_norm"] for m in host])),
        "learning_rate": float(host[-1]["learning_rate"]),
        "tokens_per_second": tokens_per_step * len(host) / max(seconds, 1e-9),
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
  """Trains (or resumes) the run in workdir up to config.train.num_steps."""
  run = setup_run(config, workdir)
  t = config.train
  console = metrics.Console(total=t.num_steps, initial=run.start_step, enabled=run.is_writer)
  _startup_report(run, console)
  if run.start_step >= t.num_steps:
    console.print(f"{run.workdir} is already trained to step {run.start_step}: raise "
                  "--config.train.num_steps to train further.")
    console.close()
    return run.state

  train_batches = batches_lib.TrainBatches(
      run.data.train.tokens, config.model.block_size, t.batch_size, config.seed,
      jax.process_index(), jax.process_count())
  val_windows = batches_lib.eval_batches(
      run.data.val.tokens, config.model.block_size, t.batch_size, t.eval_batches,
      jax.process_index(), jax.process_count())
  train_windows = batches_lib.eval_batches(
      run.data.train.tokens, config.model.block_size, t.batch_size, t.eval_batches,
      jax.process_index(), jax.process_count())
  log = metrics.MetricsLog(run.workdir, keep_through_step=run.start_step or None,
                           enabled=run.is_writer)
  tokens_per_step = t.batch_size * config.model.block_size

  def device_batch(step: int):
    return jnp.asarray(train_batches.batch(step))

  state, step = run.state, run.start_step
  interval = _Interval()
  run_started = time.perf_counter()
  next_batch = device_batch(step)
  compiling = _compile_in_background(run.train_step, state, next_batch)
  if step == 0:
    _evaluate_and_report(run, state, 0, {}, val_windows, train_windows, log, console)
  compiling.join()
  interval.reset()
  while step < t.num_steps:
    # Dispatch is asynchronous: the host prepares the next batch while this step runs, and
    # metrics stay on the device until a log line is due.
    state, step_metrics = run.train_step(state, next_batch)
    if step + 1 < t.num_steps:
      next_batch = device_batch(step + 1)
    interval.step_metrics.append(step_metrics)
    step += 1
    console.step()
    is_eval = step % t.eval_every == 0 or step == t.num_steps
    if step % t.log_every == 0 or is_eval:
      record = {"step": step, **interval.summary(tokens_per_step),
                "epoch": train_batches.epoch(step),
                "elapsed_seconds": time.perf_counter() - run_started}
      console.progress(step, record)
      if is_eval:
        _evaluate_and_report(run, state, step, record, val_windows, train_windows, log, console)
      else:
        log.write(record)
    if step % t.checkpoint_every == 0 or step == t.num_steps:
      run.checkpoints.save(step, state, {"step": step, "tokens_seen": step * tokens_per_step})
    if step % t.log_every == 0 or is_eval:
      interval.reset()  # evaluation and sampling time is not training time
  run.checkpoints.close()
  console.close()
  if run.is_writer:
    print(f"trained to step {step}; checkpoints in {run.checkpoints.directory}", flush=True)
  return state


def _compile_in_background(train_step, state, batch) -> threading.Thread:
  """Compiles the train step on another thread (XLA releases the GIL) while the step-0
  evaluation compiles and runs, so start-up pays for the two compilations at once."""
  def abstract(x):  # the cache key of a call: single-device arguments carry no sharding
    sharding = x.sharding if len(x.sharding.device_set) > 1 else None
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  args = jax.tree_util.tree_map(abstract, (state, batch))

  def compile_step():
    try:
      train_step.lower(*args).compile()  # fills the jit cache for the first call
    except Exception:  # noqa: BLE001 - the first real call reports any error itself
      pass

  thread = threading.Thread(target=compile_step, name="compile-train-step", daemon=True)
  thread.start()
  return thread


def _evaluate_and_report(run: Run, state: TrainState, step: int, record: dict,
                         val_windows, train_windows, log: metrics.MetricsLog,
                         console: metrics.Console) -> None:
  val_loss = evaluate(run, state.params, val_windows)
  record = {"step": step, **record, "eval_train_loss": evaluate(run, state.params, train_windows),
            **metrics.loss_summary("val", val_loss, run.data.val.bytes_per_token)}
  log.write(record)
  console.print(f"step {step}: train {record['eval_train_loss']:.4f}, val {val_loss:.4f} "
                f"(perplexity {record['val_perplexity']:.2f}, "
                f"{record['val_bits_per_byte']:.3f} bits/byte)")
  if run.is_writer and run.config.train.sample_tokens > 0 and step > 0:
    text = generate_sample(run, state.params, step)
    console.print(f"--- sample at step {step} ---\n{text}\n---")
    metrics.append_sample(run.workdir, step, text)
