"""Optimizer: clip by global norm, then AdamW -- or Muon for the blocks' weight matrices.

train.optimizer selects it:

  adamw  AdamW on every parameter, linear warmup then cosine decay (train.learning_rate).
  muon   Muon (optax.contrib.scale_by_muon: Nesterov momentum train.muon_momentum, then 5
         Newton-Schulz iterations that orthogonalize the update) on the attention and MLP
         kernels of the blocks, AdamW exactly as above on everything else: the embeddings
         (wte, wpe; the tied LM head is wte), an untied lm_head, biases and LayerNorms -- the
         split of modded-nanogpt and MaxText.

Both sides follow the same warmup and cosine shape: Muon's peak is train.muon_learning_rate
and its floor keeps the ratio min_learning_rate / learning_rate. Muon's update is scaled by
sqrt(max(1, fan_out / fan_in)) per matrix (Keller Jordan's rule, the default of
optax.contrib.muon), so muon_learning_rate is of the order of 0.02, not AdamW's 1e-3.
Clipping applies to the whole raw gradient before either side, as with AdamW alone. Weight
decay (train.weight_decay) stays on matrices only: Muon's kernels and AdamW's embeddings;
like AdamW's it is multiplied by the side's learning rate.

Layers stacked by scan (model.scan_layers) hold a kernel as [layer, in, out]: the Muon
dimension numbers name the last two axes, so each layer's matrix is orthogonalized on its
own (the leading axis is vmapped) and scanned and unscanned runs take the same updates.

optax.contrib.muon itself is not used because its AdamW side decays every parameter it holds
(biases and LayerNorms too) and uses Nesterov momentum; here that side is the plain AdamW of
train.optimizer=adamw, so the two optimizers differ only on the blocks' kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from optax import contrib as optax_contrib

from gpt2jax import errors

OPTIMIZERS = ("adamw", "muon")

# Matrices (dense kernels, embeddings) are decayed; biases and LayerNorm parameters are not.
# Deciding by name rather than by ndim keeps the rule right when layers are stacked by scan.
DECAYED_PARAM_NAMES = ("kernel", "embedding")

# Muon takes every dense kernel except an untied LM head's, which (like the embedding it
# would be tied to) stays with AdamW.
MUON_EXCLUDED_MODULES = ("lm_head",)

# The last two axes of a kernel are its matrix (in, out); any leading axis (layers stacked by
# scan) is a batch of independent matrices.
KERNEL_DIMENSION_NUMBERS = optax_contrib.MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)


def check_optimizer_config(train_config) -> None:
  name = train_config.get("optimizer", "adamw")
  if name not in OPTIMIZERS:
    raise errors.UserError(
        f"train.optimizer={name!r} is not an optimizer gpt2jax knows: set "
        f"--config.train.optimizer to one of {', '.join(OPTIMIZERS)}.")
  if name == "muon":
    for key in ("muon_learning_rate", "muon_momentum"):
      if not train_config[key] > 0:
        raise errors.UserError(f"train.{key} must be positive, got {train_config[key]}.")
    if train_config.muon_momentum >= 1:
      raise errors.UserError(
          f"train.muon_momentum must be below 1, got {train_config.muon_momentum}.")


def learning_rate_schedule(train_config, peak: float | None = None) -> optax.Schedule:
  """Linear warmup to `peak` (default learning_rate), then cosine decay.

  The floor is min_learning_rate, scaled by peak / learning_rate for another peak.
  """
  decay_steps = train_config.decay_steps if train_config.decay_steps > 0 else train_config.num_steps
  warmup = train_config.warmup_steps
  if warmup >= decay_steps:
    raise errors.UserError(
        f"train.warmup_steps={warmup} must be smaller than the {decay_steps} steps of the "
        "schedule (train.decay_steps, or train.num_steps when it is -1): set "
        f"--config.train.warmup_steps below {decay_steps}."
    )
  peak_value, end_value = train_config.learning_rate, train_config.min_learning_rate
  if peak is not None:
    peak_value, end_value = peak, end_value * peak / train_config.learning_rate
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_value, warmup_steps=warmup,
      decay_steps=decay_steps, end_value=end_value,
  )
  # Shifted by one so that the first update already moves (optax counts from 0, where
  # the warmup is at 0) and the last step of the run reaches min_learning_rate.
  return lambda count: schedule(count + 1)


def _leaf_name(path) -> str | None:
  return getattr(path[-1], "key", None)


def weight_decay_mask(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _leaf_name(path) in DECAYED_PARAM_NAMES, params)


def is_muon_param(path) -> bool:
  modules = [getattr(entry, "key", None) for entry in path[:-1]]
  return _leaf_name(path) == "kernel" and not set(modules) & set(MUON_EXCLUDED_MODULES)


def param_labels(params):
  """'muon' or 'adamw' for each parameter."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "muon" if is_muon_param(path) else "adamw", params)


def _adamw(train_config) -> optax.GradientTransformation:
  return optax.adamw(
      learning_rate_schedule(train_config), b1=train_config.beta1, b2=train_config.beta2,
      weight_decay=train_config.weight_decay, mask=weight_decay_mask,
  )


def _scale_by_width(updates):
  """sqrt(max(1, fan_out / fan_in)) per matrix, as optax.contrib.muon's default."""
  def scale(update):
    fan_in, fan_out = update.shape[-2], update.shape[-1]
    return update * jnp.sqrt(jnp.maximum(1.0, fan_out / fan_in)).astype(update.dtype)

  return jax.tree.map(scale, updates)


def _muon(train_config) -> optax.GradientTransformation:
  """Muon for the leaves it is given (the blocks' kernels, 2-D or stacked 3-D)."""
  every_leaf_a_matrix = lambda updates: jax.tree.map(lambda _: KERNEL_DIMENSION_NUMBERS, updates)
  return optax.chain(
      optax_contrib.scale_by_muon(beta=train_config.muon_momentum, nesterov=True,
                                  weight_dimension_numbers=every_leaf_a_matrix),
      optax.stateless(lambda updates, params: _scale_by_width(updates)),
      optax.add_decayed_weights(train_config.weight_decay),
      optax.scale_by_learning_rate(
          learning_rate_schedule(train_config, peak=train_config.muon_learning_rate)),
  )


def make_optimizer(train_config) -> optax.GradientTransformation:
  check_optimizer_config(train_config)
  clip = optax.clip_by_global_norm(train_config.grad_clip)
  if train_config.get("optimizer", "adamw") == "adamw":
    return optax.chain(clip, _adamw(train_config))
  return optax.chain(clip, optax.partition(
      {"muon": _muon(train_config), "adamw": _adamw(train_config)}, param_labels))
