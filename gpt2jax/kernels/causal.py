"""Causal self-attention of a whole sequence, as training and scoring run it: on CPU the
chunked kernel with its own gradient (with or without dropout on the weights), on GPUs and
TPUs jax.nn.dot_product_attention; chosen by `platform.by_platform`. Also
the plain softmax attention (`softmax_weights`, `weighted_values`) that the kernel and the
other paths of gpt2jax.kernels.attention are made of.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from gpt2jax.kernels.dropout import apply_keep, keep_mask, keep_threshold
from gpt2jax.kernels.platform import by_platform
from gpt2jax.kernels.products import fence, matmul, row_major, transposed

_MIN_CHUNK = 32  # queries per attention chunk, at least


def softmax_weights(q, key_segments, visible, scale: float | None):
  """softmax(q kᵀ · scale) over the keys of all segments, concatenated, in float32; keys a
  query may not see get weight 0. Every path but the fused one of GPUs and TPUs uses it.

  q: [batch, heads, q_time, head_dim]; each segment's keys [batch, heads, k_time, head_dim]
  with its `visible` mask (bool, broadcastable to [batch, heads, q_time, k_time]).
  scale None: q arrives already scaled (the chunked kernel scales it once, outside its
  custom gradient).
  """
  scores = []
  for k, seen in zip(key_segments, visible):
    score = matmul("bhqd,bhkd->bhqk", q, k)
    if scale is not None:
      score = score * scale
    scores.append(jnp.where(seen, score, jnp.finfo(jnp.float32).min))
  return jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)


def weighted_values(weights, value_segments):
  """weights @ values, the segments' values concatenated: [batch, heads, q_time, head_dim]."""
  out, first = None, 0
  for v in value_segments:
    w = weights[..., first:first + v.shape[2]]
    term = matmul("bhqk,bhkd->bhqd", w.astype(v.dtype), v).astype(v.dtype)
    out = term if out is None else out + term
    first += v.shape[2]
  return out


def causal_attention(q, k, v, chunks: int | None = None):
  """Causal softmax attention without a cache, dropout or weights to return.

  On CPU the queries are split into chunks; chunk i attends only to keys up to its own end,
  so the fully masked blocks above the diagonal are never computed (neither forward nor
  backward), and the layout [batch, heads, time, head_dim] keeps every matmul a plain batched
  one. `chunks` defaults to `attention_chunks(time)` (tests pin each count). GPUs and TPUs
  use jax.nn.dot_product_attention (chosen when lowering, see `linear`).
  """
  chunks = attention_chunks(q.shape[2]) if chunks is None else chunks
  q = q * jnp.asarray(attention_scale(q), q.dtype)
  return by_platform(
      q, k, v, cpu=lambda q, k, v: _chunked_attention(*_rows(q, k, v), (), chunks, None),
      default=_fused_attention)


def causal_attention_dropout(q, k, v, key, rate: float, chunks: int | None = None):
  """`causal_attention` with dropout on the weights (`Dropout`'s keep rule, the masks drawn
  from `key` by `dropout_masks`).

  On CPU the same chunked kernel, each chunk's weights dropped by its mask; the masks (a
  byte per visible weight) are kept for the backward rather than drawn again. GPUs and TPUs:
  the [time x time] weights made whole and dropped (jax.nn.dot_product_attention has no
  dropout).
  """
  threshold = keep_threshold(rate)
  chunks = attention_chunks(q.shape[2]) if chunks is None else chunks
  q = q * jnp.asarray(attention_scale(q), q.dtype)

  def chunked(q, k, v, key):
    masks = dropout_masks(key, q.shape, chunks, threshold)
    return _chunked_attention(*_rows(q, k, v), masks, chunks, threshold)

  def whole(q, k, v, key):
    (keep,) = dropout_masks(key, q.shape, 1, threshold)
    time = q.shape[2]
    weights = softmax_weights(q, (k,), (jnp.tril(jnp.ones((time, time), jnp.bool_)),), None)
    return weighted_values(apply_keep(weights, keep, threshold), (v,))

  return by_platform(q, k, v, key, cpu=chunked, default=whole)


def _rows(*arrays):
  """The chunked kernel's q, k, v, row-major: heads split off [batch, time, ...] arrive as a
  transposed layout, and its matmuls slice them per chunk."""
  return tuple(row_major(a) for a in arrays)


def attention_chunks(time: int) -> int:
  """How many query chunks causal attention uses: more chunks skip more of the masked upper
  triangle (work (n+1)/2n of the full square) but make more, smaller matmuls."""
  for chunks in (4, 2):
    if time % chunks == 0 and time // chunks >= _MIN_CHUNK:
      return chunks
  return 1


def dropout_masks(key, q_shape, chunks: int, threshold: int) -> tuple:
  """Per query chunk i, which of its weights [batch, heads, size, end of chunk i] dropout
  keeps; chunk i's mask from fold_in(key, i), so each chunk draws only its visible part."""
  batch, heads, time, _ = q_shape
  size = time // chunks
  return tuple(keep_mask(jax.random.fold_in(key, i), (batch, heads, size, (i + 1) * size),
                         threshold) for i in range(chunks))


def attention_scale(q) -> float:
  """Softmax attention's 1/sqrt(head_dim)."""
  return 1.0 / math.sqrt(q.shape[-1])


def _fused_attention(q, k, v):
  """GPUs and TPUs: jax's fused attention (cuDNN where available), q already scaled."""
  swap = lambda x: x.swapaxes(1, 2)  # jax's layout is [batch, time, heads, head_dim]
  return swap(jax.nn.dot_product_attention(swap(q), swap(k), swap(v), scale=1.0,
                                           is_causal=True))


def _chunked_forward(q, k, v, masks: tuple, chunks: int, threshold: int | None):
  """Per query chunk i: its softmax weights over keys [0, end of chunk i), and the output
  from them, dropped by masks[i] when there are masks (dropout; none: ())."""
  size = q.shape[2] // chunks
  weights, outputs = [], []
  for i in range(chunks):
    first, end = i * size, (i + 1) * size
    visible = jnp.arange(end)[None, :] <= jnp.arange(first, end)[:, None]  # [size, end]
    w = softmax_weights(q[:, :, first:end], (k[:, :, :end],), (visible,), None)
    weights.append(w)
    dropped = apply_keep(w, masks[i], threshold) if masks else w
    outputs.append(weighted_values(dropped, (v[:, :, :end],)))
  out = outputs[0] if chunks == 1 else jnp.concatenate(outputs, axis=2)
  return out, weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_attention(q, k, v, masks: tuple, chunks: int, threshold: int | None):
  return _chunked_forward(q, k, v, masks, chunks, threshold)[0]


def _chunked_attention_fwd(q, k, v, masks: tuple, chunks: int, threshold: int | None):
  out, weights = _chunked_forward(q, k, v, masks, chunks, threshold)
  return out, (q, k, v, masks, out, weights)


def _chunked_attention_bwd(chunks: int, threshold: int | None, residuals, d_out):
  """The attention backward with every matmul in a form XLA CPU runs fast: the two that
  contract over queries (dV = P^T dO, dK = dS^T Q) are computed transposed, dV^T = dO^T P,
  from small explicit transposes of dO and Q (never of the [time x time] weights).

  With dropout the output came from the dropped weights D = keep(P) · 256/threshold: dV
  takes D for P, and the softmax sees dP = keep(dO Vᵀ) · 256/threshold."""
  q, k, v, masks, out, weights = residuals
  size = q.shape[2] // chunks
  d_out = fence(d_out, d_out.dtype)
  # rowsum(dO * O) = rowsum(dP * P), the softmax backward's correction term (with dropout
  # too: rowsum(dP * P) = rowsum(dO Vᵀ * D) and O = D V).
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  d_out_t = transposed(d_out)  # [batch, heads, head_dim, time]
  q_t = transposed(q)
  d_k_t = jnp.zeros(k.shape[:2] + (k.shape[3], k.shape[2]), jnp.float32)
  d_v_t = jnp.zeros_like(d_k_t)
  d_q = []
  for i in range(chunks):
    first, end = i * size, (i + 1) * size
    w = weights[i]  # [batch, heads, size, end]
    d_w = matmul("bhqd,bhkd->bhqk", d_out[:, :, first:end], v[:, :, :end])
    w_out = w  # the weights that made the output
    if masks:
      d_w = apply_keep(d_w, masks[i], threshold)
      w_out = apply_keep(w, masks[i], threshold)
    d_scores = w * (d_w - delta[:, :, first:end, None])
    d_q.append(matmul("bhqk,bhkd->bhqd", d_scores.astype(k.dtype), k[:, :, :end]))
    d_v_t = d_v_t.at[:, :, :, :end].add(matmul(
        "bhdq,bhqk->bhdk", d_out_t[:, :, :, first:end], w_out.astype(d_out.dtype)))
    d_k_t = d_k_t.at[:, :, :, :end].add(matmul(
        "bhdq,bhqk->bhdk", q_t[:, :, :, first:end], d_scores.astype(q.dtype)))
  d_q = d_q[0] if chunks == 1 else jnp.concatenate(d_q, axis=2)
  return (d_q.astype(q.dtype), fence(d_k_t, q.dtype).swapaxes(2, 3).astype(k.dtype),
          fence(d_v_t, q.dtype).swapaxes(2, 3).astype(v.dtype), (None,) * len(masks))


_chunked_attention.defvjp(_chunked_attention_fwd, _chunked_attention_bwd)
