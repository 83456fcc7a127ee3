"""The platform layer: how gpt2jax.model's GPT-2 runs fast on each platform. Its interface:

- `Dense`: nn.Dense's parameters (kernel [d_in, features], bias), with a weight gradient laid
  out for XLA CPU's fast matmul; `linear` is its product alone; `tied_logits` the LM head.
- `HeadsDense`: a Dense over the heads of [batch, heads, time, head_dim] taken together, as
  on [batch, time, heads * head_dim], in one contraction instead of a transpose and a dot.
- `Dropout`: inverted dropout that draws 8 random bits per element instead of 32; its keep
  rule (`keep_mask`, `apply_keep`) is also the one attention dropout uses.
- `attention`: softmax attention; it chooses its path (per platform, per dropout, with or
  without a cache) in one place, documented there. On CPU, training with dropout takes the
  same chunked kernel as without, the weights dropped inside it (`causal_attention_dropout`).
- `cache_update`: writes new keys and values into a layer's KV cache only after the attention
  that read it.
- `matmul` / `product`: every product above, with its operands in the compute dtype
  (model.dtype) and its accumulation and result in float32.

The package's rooms: `products` (the matmuls, Dense, HeadsDense, the LM head), `dropout`
(the keep rule), `causal` (the chunked CPU attention kernel and the fused path of GPUs and
TPUs); `attention` and `cache_update`, here, choose among them and write the KV cache.

Numerics: the compute dtype is that of the matmuls' operands only. Their results, the bias,
and so everything elementwise after them (residual adds, GELU, LayerNorm, softmax) are
float32; the attention's q, k, v and the LayerNorm outputs that feed matmuls are handed over
in the compute dtype. Gradients follow the same rule, and the weight gradients are
accumulated in float32 (never rounded to bfloat16). Why a CPU needs its own layouts, and
bfloat16 its own care: gpt2jax.kernels.products.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2jax.kernels.causal import (attention_chunks, attention_scale, causal_attention,
                                    causal_attention_dropout, dropout_masks, softmax_weights,
                                    weighted_values)
from gpt2jax.kernels.dropout import Dropout, apply_keep, keep_mask, keep_threshold
from gpt2jax.kernels.platform import traced_for
from gpt2jax.kernels.products import Dense, HeadsDense, linear, matmul, product, tied_logits

__all__ = ["Dense", "Dropout", "HeadsDense", "apply_keep", "attention", "attention_chunks",
           "attention_scale", "cache_update", "causal_attention", "causal_attention_dropout",
           "dropout_masks", "keep_mask", "keep_threshold", "linear", "matmul", "product",
           "softmax_weights", "tied_logits", "traced_for", "weighted_values"]


def attention(q, k, v, *, past=None, mask=None, dropout_rate: float = 0.0,
              deterministic: bool = True, return_weights: bool = False):
  """Softmax attention of the new tokens' queries: (output [batch, heads, time, head_dim],
  the float32 weights [batch, heads, time, keys] if return_weights else None).

  q, k, v: [batch, heads, time, head_dim], the new tokens'. Without `past`, each query sees
  the keys up to its own position. With a KV cache, `past` = (keys, values, visible): the
  cache's slots [batch, heads, max_len, head_dim] and which of them each query may see
  (bool, broadcastable to [batch, 1, time, max_len]); `mask` then says which of the new keys
  each query sees ([batch, 1, time, time]). Decoding does not drop attention weights.

  The path, chosen here and nowhere else:
  - with a cache: `softmax_weights` over two segments, the cache's slots and the new keys,
    so the cache is read as it is and never copied (see `cache_update` for the write);
  - when the weights are returned (attention maps): `softmax_weights` over the causal mask,
    the one place the weights exist whole, dropped by a `Dropout` submodule while training;
  - with dropout on the weights (training, dropout_rate > 0): `causal_attention_dropout`,
    on CPU the chunked kernel dropping weights inside it, elsewhere the weights made whole
    and dropped (jax.nn.dot_product_attention has no dropout);
  - otherwise `causal_attention`: on CPU the chunked kernel with its own gradient, on GPU and
    TPU `jax.nn.dot_product_attention`.
  Dropout draws its rng from the calling flax module (a submodule's make_rng), so call this
  from inside a module's compact method.
  """
  if past is not None:
    past_k, past_v, past_visible = past
    weights = softmax_weights(q, (past_k, k), (past_visible, mask), attention_scale(q))
    return weighted_values(weights, (past_v, v)), weights if return_weights else None
  drop_weights = dropout_rate > 0.0 and not deterministic
  if return_weights:
    time = q.shape[2]
    weights = softmax_weights(q, (k,), (jnp.tril(jnp.ones((time, time), jnp.bool_)),),
                              attention_scale(q))
    kept = Dropout(dropout_rate)(weights, deterministic=not drop_weights)
    return weighted_values(kept, (v,)), weights
  if drop_weights and keep_threshold(dropout_rate) < 256:
    return causal_attention_dropout(q, k, v, _DropoutKey()(), dropout_rate), None
  return causal_attention(q, k, v), None


class _DropoutKey(nn.Module):
  """A fresh key from the calling module's "dropout" rng stream (its own name in the path)."""

  @nn.compact
  def __call__(self):
    return self.make_rng("dropout")



def cache_update(layer_cache, k, v, index, *, after):
  """A layer's (keys, values) cache, each [batch, heads, max_len, head_dim], with k and v
  written from slot `index` on, once `after` (the attention output that read the cache) is
  computed.

  Decoding reads each layer's cache and then updates it in place. Without a data dependency
  XLA cannot order the read before the write, and on CPU it then copies every layer's whole
  cache for each decoded token. min(i, i + isnan(x)) is always i, but XLA does not simplify
  it away, so the write waits for `after`.
  """
  not_a_number = jnp.isnan(after.reshape(-1)[0]).astype(index.dtype)
  index = jnp.minimum(index, index + not_a_number)
  write = lambda cache, new: jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype),
                                                          (0, 0, index, 0))
  return write(layer_cache[0], k), write(layer_cache[1], v)
