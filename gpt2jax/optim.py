"""Optimizer: clip by global norm, then AdamW with linear warmup and cosine decay."""

from __future__ import annotations

import jax
import optax

from gpt2jax import errors

# Matrices (dense kernels, embeddings) are decayed; biases and LayerNorm parameters are not.
# Deciding by name rather than by ndim keeps the rule right when layers are stacked by scan.
DECAYED_PARAM_NAMES = ("kernel", "embedding")


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warmup to learning_rate, then cosine decay to min_learning_rate."""
  decay_steps = train_config.decay_steps if train_config.decay_steps > 0 else train_config.num_steps
  warmup = train_config.warmup_steps
  if warmup >= decay_steps:
    raise errors.UserError(
        f"train.warmup_steps={warmup} must be smaller than the {decay_steps} steps of the "
        "schedule (train.decay_steps, or train.num_steps when it is -1): set "
        f"--config.train.warmup_steps below {decay_steps}."
    )
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_config.learning_rate, warmup_steps=warmup,
      decay_steps=decay_steps, end_value=train_config.min_learning_rate,
  )
  # Shifted by one so that the first update already moves (optax counts from 0, where
  # the warmup is at 0) and the last step of the run reaches min_learning_rate.
  return lambda count: schedule(count + 1)


def weight_decay_mask(params):
  def decayed(path, _):
    return getattr(path[-1], "key", None) in DECAYED_PARAM_NAMES

  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(train_config) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(train_config.grad_clip),
      optax.adamw(
          learning_rate_schedule(train_config), b1=train_config.beta1, b2=train_config.beta2,
          weight_decay=train_config.weight_decay, mask=weight_decay_mask,
      ),
  )
