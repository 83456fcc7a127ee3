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

Numerics: the compute dtype is that of the matmuls' operands only. Their results, the bias,
and so everything elementwise after them (residual adds, GELU, LayerNorm, softmax) are
float32; the attention's q, k, v and the LayerNorm outputs that feed matmuls are handed over
in the compute dtype. Gradients follow the same rule, and the weight gradients are
accumulated in float32 (never rounded to bfloat16).

Why a CPU needs its own layout: XLA CPU runs a matmul fast (YNNPACK, multi-threaded) only when
its left operand is row-major with the contraction on the minor axis; gradients that contract
over tokens otherwise get a slow generic transpose copy or a slow fallback matmul. The choice
is made when lowering (`jax.lax.platform_dependent`): GPUs and TPUs, also compiled ahead of
time on a CPU host, get plain dots and `jax.nn.dot_product_attention`. README, "Performance",
has what each of these measured.

Why bfloat16 needs care on a CPU: XLA CPU multiplies bfloat16 fast (YNNPACK, with the CPU's
bf16 dot-product instructions) only as bf16 x bf16 -> f32 with row-major operands. A
bfloat16 result, or an operand that is a transpose XLA leaves as a column-major layout, makes
it upcast both operands to a float32 matmul, plus converts around it: that is why a step
with bfloat16 compute used to be slower than float32. Hence `matmul`'s float32 result,
`_transposed`'s real copies, and the barriers (`_fence`) that keep XLA from folding
transposes back.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_BARRIER = jax.lax.optimization_barrier
_MIN_CHUNK = 32  # queries per attention chunk, at least


# ---- Dense layers ----------------------------------------------------------------------------

class Dense(nn.Module):
  """nn.Dense's parameters and result, with the CPU gradient layout of `linear`; the result
  is float32 whatever the compute dtype (see the module's docstring)."""

  features: int
  use_bias: bool
  dtype: Any  # compute dtype: the matmul's operands; the parameters are float32
  kernel_init: Any

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    y = linear(x, kernel, self.dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    return y


class HeadsDense(nn.Module):
  """Dense(features) over the heads taken together: [batch, heads, time, head_dim] ->
  [batch, time, features].

  The parameters are those of a Dense on the heads concatenated (kernel [heads * head_dim,
  features], rows head-major, and bias), so checkpoints see an ordinary projection; one
  contraction over (heads, head_dim) replaces the transpose back to [batch, time, ...] and
  leaves the layout to XLA. The result is float32, as Dense's.
  """

  features: int
  use_bias: bool
  dtype: Any
  kernel_init: Any

  @nn.compact
  def __call__(self, y):
    _, heads, _, head_dim = y.shape
    kernel = self.param("kernel", self.kernel_init, (heads * head_dim, self.features),
                        jnp.float32)
    out = product("bhtk,hkd->btd", y.astype(self.dtype),
                  kernel.reshape(heads, head_dim, self.features))
    if self.use_bias:
      out = out + self.param("bias", nn.initializers.zeros_init(), (self.features,),
                             jnp.float32)
    return out


def matmul(spec: str, a, b):
  """einsum(spec, a, b) (two operands of one dtype) accumulated and returned in float32.

  XLA CPU multiplies bfloat16 operands fast only as bf16 x bf16 -> f32, and only through
  YNNPACK: given a bf16 result it upcasts both operands to a float32 matmul. YNNPACK takes
  no matrix-vector products (a single row or column, e.g. decoding one token) nor tiny
  ones, and XLA's own matmul has no bf16 x bf16 -> f32, so those keep a bf16 result, which
  XLA upcasts itself, and are then widened.
  """
  if a.dtype.itemsize < 4 and _vector_like(spec, a, b):
    return jnp.einsum(spec, a, b).astype(jnp.float32)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _vector_like(spec: str, a, b) -> bool:
  """Whether the product has a single row or column, or only dimensions below 8."""
  inputs, out = spec.replace("...", "").split("->")
  a_axes, b_axes = inputs.split(",")
  sizes = {**dict(zip(reversed(b_axes), reversed(b.shape))),
           **dict(zip(reversed(a_axes), reversed(a.shape)))}
  lead = math.prod(a.shape[:a.ndim - len(a_axes)])  # a's axes under "..."
  free = lambda own, other: math.prod(sizes[c] for c in own if c not in other)
  rows, columns = lead * free(a_axes, b_axes), free(b_axes, a_axes)
  depth = math.prod(sizes[c] for c in a_axes if c in b_axes and c not in out)
  return rows == 1 or columns == 1 or max(rows, columns, depth) < 8


def _dot(x, y):
  """x @ y over x's last axis (y: [d_in, d_out]) by `matmul`."""
  return matmul("...i,io->...o", x, y)


def product(spec: str, a, b):
  """matmul(spec, a, b) with b cast to a's dtype, and a gradient whose matmuls also take
  a's dtype (plain autodiff would multiply the float32 output gradient by the 16-bit
  operands: a float32 matmul). spec: "A,B->C" where every axis of A and B is in C or in
  both A and B (none summed within one operand)."""
  if a.dtype == jnp.float32:
    return jnp.einsum(spec, a, b.astype(a.dtype))
  return _product(spec, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _product(spec: str, a, b):
  return matmul(spec, a, b.astype(a.dtype))


def _product_fwd(spec, a, b):
  return _product(spec, a, b), (a, b)


def _product_bwd(spec, residuals, grad):
  a, b = residuals
  a_axes, b_axes, out_axes = *spec.split("->")[0].split(","), spec.split("->")[1]
  grad = grad.astype(a.dtype)
  d_a = matmul(f"{out_axes},{b_axes}->{a_axes}", grad, b.astype(a.dtype))
  d_b = matmul(f"{a_axes},{out_axes}->{b_axes}", a, grad)
  return d_a.astype(a.dtype), d_b.astype(b.dtype)


_product.defvjp(_product_fwd, _product_bwd)


def linear(x, kernel, dtype=None):
  """x @ kernel over the last axis of x (x: [..., d_in], kernel: [d_in, d_out]), the
  operands in `dtype` (default: x's), accumulated and returned in float32. On CPU its
  gradient is `_linear_bwd`'s; elsewhere `product`'s."""
  x = x.astype(x.dtype if dtype is None else dtype)
  return jax.lax.platform_dependent(x, kernel, cpu=_linear,
                                    default=functools.partial(product, "...i,io->...o"))


@jax.custom_vjp
def _linear(x, kernel):
  return _dot(x, kernel.astype(x.dtype))


def _linear_fwd(x, kernel):
  return _linear(x, kernel), (x, kernel)


def _linear_bwd(residuals, grad):
  """The kernel gradient contracts over tokens, so one operand must be transposed: transpose
  whichever of (input, output gradient) is smaller, rather than letting XLA transpose a large
  activation with its slow generic copy. The matmuls take x's dtype, accumulate in float32."""
  x, kernel = residuals
  d_in, d_out = kernel.shape
  grad = grad.astype(x.dtype)
  x2 = x.reshape(-1, d_in)  # [tokens, d_in]
  g2 = grad.reshape(-1, d_out)  # [tokens, d_out]
  dx = _dot(grad, kernel.astype(x.dtype).T)
  # The barrier keeps XLA from folding the transpose back into the dot's dimensions.
  # A 16-bit product gets a barrier too (`_fence`): XLA would fold a transpose of it into the
  # dot's dimensions, a form that XLA CPU cannot run in bfloat16.
  if d_in <= d_out:
    dk = _fence(_dot(_transposed(x2), g2), x.dtype)
  else:
    dk = _BARRIER(_dot(_transposed(g2), x2)).T
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def _fence(x, dtype):
  """x behind a barrier when `dtype` is a 16-bit compute dtype, so that XLA neither folds a
  transpose into a bf16 product nor swaps its bf16 operand for the float32 it came from
  (either makes XLA CPU upcast it, or fail); float32 programs stay as they were."""
  return _BARRIER(x) if jnp.dtype(dtype).itemsize < 4 else x


def tied_logits(x, embedding, dtype):
  """x @ embeddingᵀ, the LM head tied to the token embedding [vocab, d], in float32 from
  operands in `dtype`: `linear`, but a float32 head on CPU keeps flax's Embed.attend product
  and its plain gradient."""
  x = x.astype(dtype)
  cpu = _linear if jnp.dtype(dtype).itemsize < 4 else jnp.dot
  return jax.lax.platform_dependent(x, embedding.T, cpu=cpu,
                                    default=functools.partial(product, "...i,io->...o"))


def _transposed(a):
  """a with its last two axes swapped, as an array of its own (row-major) for a matmul.

  The barrier keeps XLA from folding the transpose back into the dot's dimensions. A
  16-bit transpose that XLA leaves as a layout change (column-major) makes XLA CPU upcast
  the dot to float32, since its fast matmul (YNNPACK) takes bfloat16 operands row-major
  only: going through a flat copy makes the transpose real.
  """
  swapped = a.swapaxes(-1, -2)
  if a.dtype.itemsize >= 4:
    return _BARRIER(swapped)
  return _row_major(swapped)


def _row_major(a):
  """a as a row-major array of its own, when 16-bit: XLA may keep a transpose as a layout
  change (a column-major operand), which makes XLA CPU upcast a bf16 matmul to float32.
  Going through a flat copy makes the transpose real; the barrier keeps it."""
  if a.dtype.itemsize >= 4:
    return a
  return _BARRIER(a.reshape(-1)).reshape(a.shape)


# ---- Dropout ---------------------------------------------------------------------------------

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


# ---- Attention -------------------------------------------------------------------------------

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
    weights = softmax_weights(q, (past_k, k), (past_visible, mask), _scale(q))
    return weighted_values(weights, (past_v, v)), weights if return_weights else None
  drop_weights = dropout_rate > 0.0 and not deterministic
  if return_weights:
    time = q.shape[2]
    weights = softmax_weights(q, (k,), (jnp.tril(jnp.ones((time, time), jnp.bool_)),),
                              _scale(q))
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
  q = q * jnp.asarray(_scale(q), q.dtype)
  return jax.lax.platform_dependent(
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
  q = q * jnp.asarray(_scale(q), q.dtype)

  def chunked(q, k, v, key):
    masks = dropout_masks(key, q.shape, chunks, threshold)
    return _chunked_attention(*_rows(q, k, v), masks, chunks, threshold)

  def whole(q, k, v, key):
    (keep,) = dropout_masks(key, q.shape, 1, threshold)
    time = q.shape[2]
    weights = softmax_weights(q, (k,), (jnp.tril(jnp.ones((time, time), jnp.bool_)),), None)
    return weighted_values(apply_keep(weights, keep, threshold), (v,))

  return jax.lax.platform_dependent(q, k, v, key, cpu=chunked, default=whole)


def _rows(*arrays):
  """The chunked kernel's q, k, v, row-major: heads split off [batch, time, ...] arrive as a
  transposed layout, and its matmuls slice them per chunk."""
  return tuple(_row_major(a) for a in arrays)


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


def _scale(q) -> float:
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
  d_out = _fence(d_out, d_out.dtype)
  # rowsum(dO * O) = rowsum(dP * P), the softmax backward's correction term (with dropout
  # too: rowsum(dP * P) = rowsum(dO Vᵀ * D) and O = D V).
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  d_out_t = _transposed(d_out)  # [batch, heads, head_dim, time]
  q_t = _transposed(q)
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
  return (d_q.astype(q.dtype), _fence(d_k_t, q.dtype).swapaxes(2, 3).astype(k.dtype),
          _fence(d_v_t, q.dtype).swapaxes(2, 3).astype(v.dtype), (None,) * len(masks))


_chunked_attention.defvjp(_chunked_attention_fwd, _chunked_attention_bwd)


# ---- KV cache --------------------------------------------------------------------------------

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
