"""Dropout with a cheap mask: `Dropout`, and its keep rule (`keep_threshold`, `keep_mask`,
`apply_keep`), which attention dropout (gpt2jax.kernels.causal) uses too."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Dropout(nn.Module):
  """Inverted dropout whose mask costs a quarter of flax's nn.Dropout to draw: one 32-bit
  threefry word decides four elements, a byte each (`keep_mask`).

  The keep probability is rounded to a multiple of 1/256 (0.8 -> 205/256; rates below 1/512
  drop nothing) and kept values are scaled by that rounded probability, so the expected
  output is still exactly the input.
  """

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    threshold = keep_threshold(self.rate)
    if deterministic or threshold >= 256:
      return x
    return apply_keep(x, keep_mask(self.make_rng("dropout"), x.shape, threshold), threshold)


def keep_threshold(rate: float) -> int:
  """Dropout's keep rule: an element whose random byte is below this is kept."""
  return round((1.0 - rate) * 256)


def keep_mask(key, shape, threshold: int):
  """Which elements dropout keeps (bool, `shape`): a random byte per element, 4 per 32-bit
  word, kept when below `threshold`. The bits are shaped like the mask (last axis / 4), so
  they keep its sharding."""
  *lead, last = shape
  words = jax.random.bits(key, (*lead, -(-last // 4)), jnp.uint32)
  bytes_ = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(*lead, -1)
  return (bytes_ if bytes_.shape[-1] == last else bytes_[..., :last]) < threshold


def apply_keep(x, keep, threshold: int):
  """x with the dropped elements zeroed and the kept ones scaled by 256 / threshold."""
  return jnp.where(keep, x / jnp.asarray(threshold / 256, x.dtype), jnp.zeros_like(x))
