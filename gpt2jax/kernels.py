"""Matmul and causal attention with gradients laid out for XLA CPU, plain ops elsewhere.

XLA CPU runs a matmul fast (YNNPACK, multi-threaded) only when its left operand is row-major
with the contraction on the minor axis; gradients that contract over tokens otherwise get a
slow generic transpose copy or a slow fallback matmul. The functions here are chosen per
platform when lowering (`jax.lax.platform_dependent`): GPUs and TPUs get plain dots and
`jax.nn.dot_product_attention`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_BARRIER = jax.lax.optimization_barrier
_MIN_CHUNK = 32  # queries per attention chunk, at least


@jax.custom_vjp
def _linear(x, kernel):
  return jnp.dot(x, kernel)


def _linear_fwd(x, kernel):
  return jnp.dot(x, kernel), (x, kernel)


def _linear_bwd(residuals, grad):
  """Gradients laid out for XLA CPU's fast matmul (YNNPACK), which needs a row-major
  left operand: the kernel gradient contracts over tokens, so one operand must be
  transposed, and we transpose whichever of (input, output gradient) is smaller instead of
  letting XLA transpose a large activation with its slow generic copy."""
  x, kernel = residuals
  d_in, d_out = kernel.shape
  x2 = x.reshape(-1, d_in)  # [tokens, d_in]
  g2 = grad.reshape(-1, d_out)  # [tokens, d_out]
  dx = jnp.dot(grad, kernel.T)
  # The barrier keeps XLA from folding the transpose back into the dot's dimensions.
  if d_in <= d_out:
    dk = jnp.dot(_BARRIER(x2.T), g2)
  else:
    dk = _BARRIER(jnp.dot(_BARRIER(g2.T), x2)).T
  return dx, dk.astype(kernel.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear(x, kernel):
  """x @ kernel over the last axis of x; x: [..., d_in], kernel: [d_in, d_out].

  The CPU gradient layout is chosen when lowering for a CPU (also when compiling for a TPU
  ahead of time on a CPU host, the TPU gets the plain dot).
  """
  return jax.lax.platform_dependent(x, kernel, cpu=_linear, default=jnp.dot)


def attention_chunks(time: int) -> int:
  """How many query chunks causal attention uses: more chunks skip more of the masked upper
  triangle (work (n+1)/2n of the full square) but make more, smaller matmuls."""
  for chunks in (4, 2):
    if time % chunks == 0 and time // chunks >= _MIN_CHUNK:
      return chunks
  return 1


def _chunk_weights(q_chunk, k, first_query: int):
  """Softmax weights (float32) of one query chunk over keys [0, first_query + chunk)."""
  size, end = q_chunk.shape[2], first_query + q_chunk.shape[2]
  scores = jnp.einsum("bhqd,bhkd->bhqk", q_chunk, k[:, :, :end],
                      preferred_element_type=jnp.float32)  # [batch, heads, size, end]
  visible = jnp.arange(end)[None, :] <= (first_query + jnp.arange(size))[:, None]
  scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1)


def _chunked_forward(q, k, v, chunks: int):
  size = q.shape[2] // chunks
  weights, outputs = [], []
  for i in range(chunks):
    w = _chunk_weights(q[:, :, i * size:(i + 1) * size], k, i * size)
    weights.append(w)
    outputs.append(jnp.einsum("bhqk,bhkd->bhqd", w.astype(v.dtype), v[:, :, :(i + 1) * size]))
  out = outputs[0] if chunks == 1 else jnp.concatenate(outputs, axis=2)
  return out, weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_attention(q, k, v, chunks: int):
  return _chunked_forward(q, k, v, chunks)[0]


def _chunked_attention_fwd(q, k, v, chunks: int):
  out, weights = _chunked_forward(q, k, v, chunks)
  return out, (q, k, v, out, weights)


def _chunked_attention_bwd(chunks: int, residuals, d_out):
  """The attention backward with every matmul in a form XLA CPU runs fast: the two that
  contract over queries (dV = P^T dO, dK = dS^T Q) are computed transposed, dV^T = dO^T P,
  from small explicit transposes of dO and Q (never of the [time x time] weights)."""
  q, k, v, out, weights = residuals
  size = q.shape[2] // chunks
  # rowsum(dO * O) = rowsum(dP * P): the softmax backward's correction term.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  d_out_t = _BARRIER(d_out.swapaxes(2, 3))  # [batch, heads, head_dim, time]
  q_t = _BARRIER(q.swapaxes(2, 3))
  d_k_t = jnp.zeros(k.shape[:2] + (k.shape[3], k.shape[2]), jnp.float32)
  d_v_t = jnp.zeros_like(d_k_t)
  d_q = []
  for i in range(chunks):
    first, end = i * size, (i + 1) * size
    w = weights[i]  # [batch, heads, size, end]
    d_w = jnp.einsum("bhqd,bhkd->bhqk", d_out[:, :, first:end], v[:, :, :end],
                     preferred_element_type=jnp.float32)
    d_scores = w * (d_w - delta[:, :, first:end, None])
    d_q.append(jnp.einsum("bhqk,bhkd->bhqd", d_scores.astype(k.dtype), k[:, :, :end],
                          preferred_element_type=jnp.float32))
    d_v_t = d_v_t.at[:, :, :, :end].add(jnp.einsum(
        "bhdq,bhqk->bhdk", d_out_t[:, :, :, first:end], w.astype(d_out.dtype),
        preferred_element_type=jnp.float32))
    d_k_t = d_k_t.at[:, :, :, :end].add(jnp.einsum(
        "bhdq,bhqk->bhdk", q_t[:, :, :, first:end], d_scores.astype(q.dtype),
        preferred_element_type=jnp.float32))
  d_q = d_q[0] if chunks == 1 else jnp.concatenate(d_q, axis=2)
  return (d_q.astype(q.dtype), d_k_t.swapaxes(2, 3).astype(k.dtype),
          d_v_t.swapaxes(2, 3).astype(v.dtype))


_chunked_attention.defvjp(_chunked_attention_fwd, _chunked_attention_bwd)


def causal_attention(q, k, v, chunks: int | None = None):
  """Causal softmax attention without a cache. q, k, v: [batch, heads, time, head_dim].

  On CPU the queries are split into chunks; chunk i attends only to keys up to its own end,
  so the fully masked blocks above the diagonal are never computed (neither forward nor
  backward). Layout [batch, heads, time, head_dim] keeps every matmul a plain batched one.
  Other platforms use jax.nn.dot_product_attention (chosen when lowering, see `linear`).
  """
  time, head_dim = q.shape[2], q.shape[3]
  chunks = attention_chunks(time) if chunks is None else chunks  # tests pin each count
  q = q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)
  return jax.lax.platform_dependent(
      q, k, v, cpu=lambda q, k, v: _chunked_attention(q, k, v, chunks),
      default=_fused_attention)


def _fused_attention(q, k, v):
  """GPUs and TPUs: jax's fused attention (cuDNN where available), q already scaled."""
  swap = lambda x: x.swapaxes(1, 2)  # jax's layout is [batch, time, heads, head_dim]
  return swap(jax.nn.dot_product_attention(swap(q), swap(k), swap(v), scale=1.0,
                                           is_causal=True))
