"""The train state and the pure train/eval steps, jitted over a device mesh.

Everything here is a function of its arguments (no I/O): train_lib runs the loop around it,
aot compiles it for TPU topologies, benchmarks time it. validate_config is the one check of a
run's config, made before any data is read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gpt2jax import errors, kernels, optim, parallel, runtime
from gpt2jax.model import GPT, GPTConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: number of updates applied
  params: Any
  opt_state: Any


def _init_fn(model: GPT, optimizer: optax.GradientTransformation) -> Callable:
  def init(key):
    params = model.init(key, jnp.zeros((1, model.config.block_size), jnp.int32))["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

  return init


def init_train_state(model: GPT, optimizer: optax.GradientTransformation, seed: int,
                     shardings: Any = None, compiler_options: dict | None = None,
                     platform: str | None = None) -> TrainState:
  """A fresh state; with shardings, each device creates only its own shards. platform: the
  devices', when known (the kernels then trace only its path: kernels.traced_for)."""
  return jax.jit(kernels.traced_for(platform, _init_fn(model, optimizer)),
                 out_shardings=shardings,
                 compiler_options=compiler_options)(jax.random.key(seed))


def abstract_train_state(model: GPT, optimizer: optax.GradientTransformation,
                         platform: str | None = None) -> TrainState:
  """Shapes and dtypes of the state, without computing it."""
  return jax.eval_shape(kernels.traced_for(platform, _init_fn(model, optimizer)),
                        jax.random.key(0))


def cross_entropy(logits, targets):
  """Mean next-token loss in nats, computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets).mean()


def micro_batches(batch, grad_accum_steps: int):
  """[B, T+1] -> [grad_accum_steps, B / grad_accum_steps, T+1].

  Micro-batch i takes rows i, i+A, i+2A, ...: every device holds a contiguous block of rows,
  so each micro-batch draws evenly from every device and needs no data movement.
  """
  rows, length = batch.shape
  return batch.reshape(rows // grad_accum_steps, grad_accum_steps, length).swapaxes(0, 1)


def make_train_step(model: GPT, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, seed: int, grad_accum_steps: int = 1, *,
                    skip_nonfinite: bool = False) -> Callable:
  """train_step(state, batch [B, T+1] int32) -> (state, metrics); pure, ready for jit.

  With grad_accum_steps > 1 the batch is processed as that many micro-batches under
  `lax.scan`, summing float32 gradients: the same update as one batch of B, in the memory
  of B / grad_accum_steps.

  metrics["nonfinite"] flags a NaN/inf loss or gradient norm; with skip_nonfinite such an
  update is not applied (the step still counts, so the batches stay those of a clean run).
  """
  dropout_key = jax.random.key(seed + 1)

  def loss_and_grads(params, batch, rng):
    def loss_fn(params):
      logits, _ = model.apply({"params": params}, batch[:, :-1], deterministic=False,
                              rngs={"dropout": rng})
      return cross_entropy(logits, batch[:, 1:])

    return jax.value_and_grad(loss_fn)(params)

  def accumulated_loss_and_grads(params, batch, rng):
    def add_micro_batch(totals, micro):
      index, rows = micro
      loss, grads = loss_and_grads(params, rows, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, totals, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    micro = (jnp.arange(grad_accum_steps), micro_batches(batch, grad_accum_steps))
    totals, _ = jax.lax.scan(add_micro_batch, zeros, micro)
    return jax.tree.map(lambda total: total / grad_accum_steps, totals)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(dropout_key, state.step)  # the same dropout on resume
    if grad_accum_steps == 1:
      loss, grads = loss_and_grads(state.params, batch, rng)
    else:
      loss, grads = accumulated_loss_and_grads(state.params, batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    nonfinite = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    if skip_nonfinite:
      keep_old = lambda new, old: jnp.where(nonfinite, old, new)
      params = jax.tree.map(keep_old, params, state.params)
      opt_state = jax.tree.map(keep_old, opt_state, state.opt_state)
    step_metrics = {"loss": loss, "grad_norm": grad_norm,
                    "learning_rate": schedule(state.step), "nonfinite": nonfinite}
    return TrainState(state.step + 1, params, opt_state), step_metrics

  return train_step


def make_eval_step(model: GPT) -> Callable:
  """eval_step(params, batch) -> mean loss, without dropout."""

  def eval_step(params, batch):
    logits, _ = model.apply({"params": params}, batch[:, :-1])
    return cross_entropy(logits, batch[:, 1:])

  return eval_step


def validate_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> GPTConfig:
  """Checks every value of a run's config once, before any data is read or file written.

  Returns the model's shape, built from config.model. Its vocab_size is config.model's when
  set (init_from sets it), else 1 until the tokenizer is known: replace it then with
  dataclasses.replace(shape, vocab_size=tokenizer.model_vocab_size(...)).
  """
  t = config.train
  for key in ("batch_size", "num_steps", "eval_every", "eval_batches", "checkpoint_every",
              "log_every", "keep_checkpoints", "grad_accum_steps"):
    if t[key] < 1:
      raise errors.UserError(f"train.{key} must be at least 1, got {t[key]}.")
  if t.learning_rate <= 0:
    raise errors.UserError(f"train.learning_rate must be positive, got {t.learning_rate}.")
  if config.tokenizer.kind == "hf" and not config.tokenizer.get("path"):
    raise errors.UserError(
        "tokenizer.kind='hf' reads a tokenizer.json: set --config.init_from to a transformers "
        "GPT-2 directory (its weights and tokenizer), or --config.tokenizer.path to a "
        "tokenizer.json to train a new model with.")
  shape = GPTConfig.from_config(config.model, config.model.get("vocab_size") or 1)
  parallel.check_batch_size(t.batch_size, mesh, t.grad_accum_steps)
  optim.learning_rate_schedule(t)  # the schedule's own checks
  optim.check_optimizer_config(t)
  return shape


@dataclasses.dataclass
class ShardedSteps:
  """The train and eval steps jitted over a mesh, and where every array lives."""

  mesh: jax.sharding.Mesh
  abstract_state: TrainState  # ShapeDtypeStructs carrying the state's shardings
  batch_sharding: jax.sharding.NamedSharding
  init: Callable  # seed -> TrainState, created in place on the mesh
  train_step: Callable  # jitted, state donated
  eval_step: Callable

  def abstract_batch(self, batch_size: int, block_size: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((batch_size, block_size + 1), jnp.int32,
                                sharding=self.batch_sharding)

  def place_batch(self, local_rows: np.ndarray) -> jax.Array:
    return parallel.place_batch(local_rows, self.batch_sharding)


def make_sharded_steps(config: ml_collections.ConfigDict, model: GPT,
                       mesh: jax.sharding.Mesh) -> ShardedSteps:
  """Shardings from the partition rules; steps jitted with them, the train state donated.

  config has passed validate_config for this mesh.
  """
  t = config.train
  optimizer = optim.make_optimizer(t)
  schedule = optim.learning_rate_schedule(t)
  platform = mesh.devices.flat[0].platform  # every program is traced for it: kernels.traced_for
  abstract = abstract_train_state(model, optimizer, platform)
  state_shardings = parallel.tree_shardings(abstract, mesh)
  batch_sharding = parallel.batch_sharding(mesh)
  scalar = parallel.replicated(mesh)
  options = runtime.compiler_options(platform)
  train_step = jax.jit(kernels.traced_for(platform, make_train_step(
      model, optimizer, schedule, config.seed, t.grad_accum_steps,
      skip_nonfinite=t.get("skip_nonfinite", False))),
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, scalar),
      donate_argnums=0, compiler_options=options)
  eval_step = jax.jit(kernels.traced_for(platform, make_eval_step(model)),
                      in_shardings=(state_shardings.params, batch_sharding), out_shardings=scalar,
                      compiler_options=options)
  return ShardedSteps(
      mesh, parallel.abstract_with_shardings(abstract, state_shardings), batch_sharding,
      lambda seed: init_train_state(model, optimizer, seed, state_shardings, options, platform),
      train_step, eval_step)
