"""Training: the loop around the pure steps of gpt2jax.steps (data, evaluation, samples,
checkpoints, metrics, stopping)."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Callable

import jax
import ml_collections
import numpy as np

from gpt2jax import aot, errors, flops, metrics, parallel, plots, preemption, pretrained
from gpt2jax import sampling, workdir as workdir_lib
from gpt2jax.checkpoint import Checkpoints
from gpt2jax.data import batches as batches_lib
from gpt2jax.data.pipeline import PreparedData, prepare_data_on_every_process
from gpt2jax.model import GPT, GPTConfig, count_params
from gpt2jax.nonfinite import NonfiniteGuard, all_finite
from gpt2jax.steps import ShardedSteps, TrainState, make_sharded_steps, validate_config
from gpt2jax.tokenizer import model_vocab_size

# Dispatch is asynchronous, and the loop reads metrics only at log lines: unbounded, the host
# would queue up to log_every steps, and a stop request would wait for all of them. After
# dispatching step n the host waits until step n - MAX_UNFINISHED_STEPS has finished: the
# device still has step n queued behind the one it runs, so no time is lost as long as the
# host prepares a step faster than the device runs one, and a stop request is honoured at
# most MAX_UNFINISHED_STEPS + 1 steps after the last step the device had finished when it
# came (the one it was running included). 2 gave the same throughput on the benchmark shapes
# (README, "Stopping and preemption") and stops a step later.
MAX_UNFINISHED_STEPS = 1


@dataclasses.dataclass
class Run:
  """Everything the loop needs, built once from (config, workdir)."""

  config: ml_collections.ConfigDict
  workdir: Path
  data: PreparedData
  model: GPT
  checkpoints: Checkpoints
  state: TrainState
  start_step: int
  eval_step: Callable  # (params, global batch) -> loss
  is_writer: bool
  resume_meta: dict  # the `meta` of the checkpoint resumed from ({} for a fresh run)
  steps: ShardedSteps
  compiling: concurrent.futures.Future  # -> aot.CompiledStep of the train step

  def place_batch(self, local_rows: np.ndarray) -> jax.Array:
    """This process's rows of a batch -> the global batch, split over the mesh."""
    return self.steps.place_batch(local_rows)

  def compiled_train_step(self) -> aot.CompiledStep:
    """The train step compiled ahead of time (waits for the compilation to finish)."""
    return _compiled(self.compiling, "train step")


def _compiled(compiling: concurrent.futures.Future, name: str) -> aot.CompiledStep:
  """The result of a background compilation; one that does not fit names the fixes."""
  try:
    return compiling.result()
  except aot.DoesNotFit as e:
    raise errors.UserError(f"The {name} does not fit in device memory ({e}): "
                           f"{aot.MEMORY_HINT}.") from e


def _when_compiled(compiling: concurrent.futures.Future, name: str) -> Callable:
  """A callable for a step compiling in the background: its first call waits for it."""
  def call(*args):
    return _compiled(compiling, name).executable(*args)

  return call


def setup_run(config: ml_collections.ConfigDict, workdir: Path, mesh: jax.sharding.Mesh,
              model_shape: GPTConfig) -> Run:
  """Everything a run needs; train_and_evaluate has validated config for mesh (which gave
  model_shape) and made workdir."""
  is_writer = jax.process_index() == 0
  checkpoints = Checkpoints(workdir, keep=config.train.keep_checkpoints)
  workdir_lib.check_resumable(workdir, config, checkpoints.latest_step() is not None)
  start_step = checkpoints.latest_step() or 0
  data = prepare_data_on_every_process(config, workdir, resuming=bool(start_step))
  config.model.vocab_size = model_vocab_size(data.tokenizer, config.model)  # kept in config.json
  model = GPT(dataclasses.replace(model_shape, vocab_size=config.model.vocab_size))

  steps = make_sharded_steps(config, model, mesh)
  # The train and eval steps compile on other threads (XLA compiles without the GIL) while
  # this one creates or restores the state, whose own initializer compiles too: start-up
  # pays for the longest compilation, not for their sum.
  batch = steps.abstract_batch(config.train.batch_size, config.model.block_size)
  compiling = aot.compile_step_in_background(steps.train_step, mesh, steps.abstract_state, batch)
  eval_step = _when_compiled(aot.compile_step_in_background(
      steps.eval_step, mesh, steps.abstract_state.params, batch), "evaluation step")
  resume_meta = {}
  if start_step:  # restored straight onto this mesh, whatever mesh saved it
    state, resume_meta = checkpoints.restore(start_step, steps.abstract_state)
  else:
    state = steps.init(config.seed)
    if config.init_from:  # a GPT-2 checkpoint's weights instead of random ones
      state = state.replace(
          params=pretrained.initial_params(config, model, steps.abstract_state.params))
  return Run(config, workdir, data, model, checkpoints, state, start_step, eval_step,
             is_writer, resume_meta, steps, compiling)


class UnfinishedSteps:
  """Keeps at most `limit` dispatched device computations unfinished (see
  MAX_UNFINISHED_STEPS), by waiting for a small output of each."""

  def __init__(self, limit: int):
    self.limit = limit
    self._outputs: collections.deque = collections.deque()

  def dispatched(self, small_output: jax.Array) -> None:
    self._outputs.append(small_output)
    while len(self._outputs) > self.limit:
      self._outputs.popleft().block_until_ready()


def evaluate(run: Run, params, windows: list[np.ndarray],
             stop_requests: preemption.StopRequests | None = None) -> float | None:
  """Mean loss over the windows; None when a stop request cut it short (on a single host)."""
  losses, unfinished = [], UnfinishedSteps(MAX_UNFINISHED_STEPS)
  for batch in windows:
    if stop_requests is not None and stop_requests.requested():
      return None
    losses.append(run.eval_step(params, run.place_batch(batch)))
    unfinished.dispatched(losses[-1])
  return float(np.mean(jax.device_get(losses)))


def generate_sample(run: Run, params, step: int) -> str:
  t = run.config.train
  tokenizer = run.data.tokenizer
  options = sampling.SamplingOptions(max_new_tokens=t.sample_tokens,
                                     temperature=t.sample_temperature, top_k=t.sample_top_k)
  new = sampling.generate(run.model, params, [tokenizer.encode_prompt(t.sample_prompt)], options,
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=step,
                          vocab_size=tokenizer.vocab_size)[0]
  return t.sample_prompt + tokenizer.decode(new)


def _startup_report(run: Run, console: metrics.Console) -> None:
  data, cfg = run.data, run.model.config
  console.print(
      f"corpus {run.config.data.corpus!r}: {data.num_documents:,} documents, "
      f"{data.num_characters:,} characters; {data.tokenizer.kind} tokenizer "
      f"({'trained' if data.trained_tokenizer and data.tokenizer.kind != 'hf' else 'loaded'}), "
      f"vocabulary {data.tokenizer.vocab_size:,}; tokens train {len(data.train.tokens):,} / val "
      f"{len(data.val.tokens):,} ({data.val.bytes_per_token:.2f} bytes per token)")
  console.print(
      f"model: {cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}, block "
      f"{cfg.block_size}, {count_params(run.state.params):,} parameters, {cfg.dtype}; "
      + (f"resuming from step {run.start_step}" if run.start_step else
         f"starting from {run.config.init_from}" if run.config.init_from else
         "starting from scratch"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *,
                       resume_command: str = "") -> TrainState:
  """Trains (or resumes) the run in workdir up to config.train.num_steps.

  SIGTERM or SIGINT stops it, with a checkpoint, at most MAX_UNFINISHED_STEPS + 1 steps
  after the last one the device had finished (gpt2jax.preemption); resume_command is the
  command shown for resuming. A NaN or infinite loss (or parameters, at a save) stops it with
  errors.TrainingDiverged, keeping the last good checkpoint.
  """
  config, init_note = pretrained.resolve_config(config)
  if init_note and jax.process_index() == 0:
    print(init_note, flush=True)
  mesh = parallel.make_mesh(config.mesh)
  model_shape = validate_config(config, mesh)
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise errors.UserError(f"--workdir {workdir} is a file, not a directory.")
  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0):
    run = setup_run(config, workdir, mesh, model_shape)
    try:
      with preemption.StopRequests(announce=run.is_writer) as stop_requests:
        return _train(run, stop_requests, resume_command)
    finally:
      run.checkpoints.close()  # waits for a save in flight, also when stopping on an error


def _train(run: Run, stop_requests: preemption.StopRequests, resume_command: str
           ) -> TrainState:
  config = run.config
  t = config.train
  console = metrics.Console(total=t.num_steps, initial=run.start_step, enabled=run.is_writer)
  _startup_report(run, console)
  # The log line (with evaluation and sample) of the step a stop request cut short, if any.
  record_due = run.resume_meta.get("record_due")
  if run.start_step >= t.num_steps and not record_due:
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
  if run.is_writer:
    workdir_lib.save_config(run.workdir, config)  # only once the config has proved usable
    for name in run.checkpoints.remove_unfinished_saves():
      console.print(f"removed {name}: a save that an earlier run did not finish")
  log = _metrics_log(run)
  tokens_per_step = t.batch_size * config.model.block_size

  state, step = run.state, run.start_step
  interval = metrics.Interval(run.resume_meta.get("pending_metrics", []))
  guard = NonfiniteGuard(config, run.checkpoints)
  run_started = time.perf_counter() - run.resume_meta.get("elapsed_seconds", 0.0)
  report = functools.partial(  # (state, step, record) -> False if a stop request cut it short
      _evaluate_and_report, run, val_windows=val_windows, train_windows=train_windows, log=log,
      console=console, stop_requests=stop_requests)
  stopping = False
  if step == 0 or record_due:  # the step-0 evaluation, or the one a stop request put off
    stopping = not report(state, step, record_due or {})
  # Compiles the finiteness check of every save now, while the train step compiles, rather
  # than in the first save (which may be a stop's).
  all_finite(state.params)
  compiled = run.compiled_train_step()
  for line in aot.startup_lines(run.steps.mesh, state, compiled):
    console.print(line)
  train_step = compiled.executable
  next_batch = run.place_batch(train_batches.batch(step))
  unfinished = UnfinishedSteps(MAX_UNFINISHED_STEPS)
  interval.restart_clock()
  stopping = stopping or stop_requests.requested()  # (a request during the compile)
  while step < t.num_steps and not stopping:
    # Dispatch is asynchronous: the host prepares the next batch while this step runs, and
    # metrics stay on the device until a log line is due (see MAX_UNFINISHED_STEPS).
    state, step_metrics = train_step(state, next_batch)
    if step + 1 < t.num_steps:
      next_batch = run.place_batch(train_batches.batch(step + 1))
    interval.add(step_metrics)
    unfinished.dispatched(step_metrics["loss"])
    step += 1
    console.step()
    stopping = stop_requests.should_stop(step)
    is_eval = step % t.eval_every == 0 or step == t.num_steps
    is_log = step % t.log_every == 0 or is_eval
    is_save = step % t.checkpoint_every == 0 or step == t.num_steps or stopping
    if is_log or is_save:
      guard.check(interval, step)  # before anything is logged or saved
    record_due = None
    if is_log:
      record = {"step": step, **interval.summary(tokens_per_step, count_skipped=guard.skip),
                "tokens_seen": step * tokens_per_step, "epoch": train_batches.epoch(step),
                "elapsed_seconds": time.perf_counter() - run_started}
      console.progress(step, record)
      if is_eval and (stopping or not report(state, step, record)):
        record_due, stopping = record, True  # the resumed run evaluates and samples
      elif not is_eval:
        log.write(record)
      interval.reset()
    stopping = stopping or stop_requests.requested()  # (a request during the evaluation)
    if is_save or stopping:
      meta = {"step": step, "tokens_seen": step * tokens_per_step,
              "elapsed_seconds": time.perf_counter() - run_started,
              "pending_metrics": interval.pending()}
      guard.check_params(state.params, step)
      run.checkpoints.save(step, state, {**meta, "record_due": record_due} if record_due
                           else meta)
    if is_log:
      interval.restart_clock()  # evaluation, sampling and saving are not training time
  run.checkpoints.wait()
  log.close()
  console.close()
  if run.is_writer:
    if stopping:
      stopped = (f"after step {step} of {t.num_steps}; checkpoint saved in "
                 f"{run.checkpoints.path(step)} ({stop_requests.seconds_since_request():.1f} s "
                 f"from the {stop_requests.request()} to the checkpoint on disk)" if step
                 else "before the first step: nothing to save")
      print(f"Stopped by {stop_requests.reason()} {stopped}.\nTo resume, run the same command "
            f"again{': ' + resume_command if resume_command else '.'}", flush=True)
    else:
      print(f"trained to step {step}; checkpoints in {run.checkpoints.directory}", flush=True)
      _write_run_report(run, state, tokens_per_step)
  return state


def _metrics_log(run: Run) -> metrics.MetricsLog:
  """metrics.jsonl and TensorBoard, with the model's FLOPs per token for MFU."""
  log = metrics.MetricsLog(
      run.workdir, keep_through_step=run.start_step or None, enabled=run.is_writer,
      flops_per_token=flops.gpt_flops_per_token(run.model.config, run.state.params),
      peak_flops=flops.peak_flops_per_second([d.device_kind for d in jax.devices()]))
  log.write_text("config", json.dumps(run.config.to_dict(), indent=1, ensure_ascii=False),
                 run.start_step)
  return log


def _write_run_report(run: Run, state: TrainState, tokens_per_step: int) -> None:
  """summary.json and plots/loss.png, from the whole run's metrics.jsonl."""
  num_params = count_params(state.params)
  summary = metrics.summarize_run(metrics.read_metrics(run.workdir), num_params=num_params,
                                  tokens_per_step=tokens_per_step)
  metrics.write_summary(run.workdir, summary)
  loss_png = plots.write_loss_plot(run.workdir, num_params)
  summary_json = run.workdir / workdir_lib.SUMMARY_JSON
  print(f"{metrics.format_summary(summary)}\nwrote {summary_json} and {loss_png}", flush=True)


def _evaluate_and_report(run: Run, state: TrainState, step: int, record: dict,
                         val_windows, train_windows, log: metrics.MetricsLog,
                         console: metrics.Console, stop_requests: preemption.StopRequests
                         ) -> bool:
  """Writes the step's record with its evaluation, and a sample; False, having written
  nothing, when a stop request (on a single host) came before they were done."""
  val_loss = evaluate(run, state.params, val_windows, stop_requests)
  eval_train_loss = (None if val_loss is None else
                     evaluate(run, state.params, train_windows, stop_requests))
  if eval_train_loss is None or stop_requests.requested():
    return False
  # Before the first step there is no running training loss: the evaluated one stands in.
  record = {"step": step, "train_loss": eval_train_loss, **record,
            **metrics.loss_summary("eval_train", eval_train_loss, run.data.train.bytes_per_token),
            **metrics.loss_summary("val", val_loss, run.data.val.bytes_per_token)}
  log.write(record)
  console.print(f"step {step}: train {record['eval_train_loss']:.4f}, val {val_loss:.4f} "
                f"(perplexity {record['val_perplexity']:.2f}, "
                f"{record['val_bits_per_byte']:.3f} bits/byte)")
  if run.config.train.sample_tokens > 0 and step > 0:
    params = parallel.host_local(state.params)  # a collective when there are several processes
    if not run.is_writer:
      return True
    text = generate_sample(run, params, step)
    console.print(f"--- sample at step {step} ---\n{text}\n---")
    log.write_sample(step, text)
  return True
