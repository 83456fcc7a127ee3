"""Matrix products laid out for XLA CPU's fast matmul, in the compute dtype: `matmul` and
`product` (operands in the compute dtype, accumulation and result in float32), `linear` with
its CPU gradient, the `Dense` and `HeadsDense` layers on them, and the tied LM head.

Why a CPU needs its own layout: XLA CPU runs a matmul fast (YNNPACK, multi-threaded) only when
its left operand is row-major with the contraction on the minor axis; gradients that contract
over tokens otherwise get a slow generic transpose copy or a slow fallback matmul. The choice
is made by `platform.by_platform` (while tracing for a known platform, else when lowering):
GPUs and TPUs, also compiled ahead of time on a CPU host, get plain dots. README,
"Performance", has what each of these measured.

Why bfloat16 needs care on a CPU: XLA CPU multiplies bfloat16 fast (YNNPACK, with the CPU's
bf16 dot-product instructions) only as bf16 x bf16 -> f32 with row-major operands. A
bfloat16 result, or an operand that is a transpose XLA leaves as a column-major layout, makes
it upcast both operands to a float32 matmul, plus converts around it: that is why a step
with bfloat16 compute used to be slower than float32. Hence `matmul`'s float32 result,
`transposed`'s and `row_major`'s real copies, and the barriers (`fence`) that keep XLA from
folding transposes back. The chunked attention kernel (gpt2jax.kernels.causal) uses them too.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2jax.kernels.platform import by_platform

_BARRIER = jax.lax.optimization_barrier


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
  return by_platform(x, kernel, cpu=_linear,
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
  # A 16-bit product gets a barrier too (`fence`): XLA would fold a transpose of it into the
  # dot's dimensions, a form that XLA CPU cannot run in bfloat16.
  if d_in <= d_out:
    dk = fence(_dot(transposed(x2), g2), x.dtype)
  else:
    dk = _BARRIER(_dot(transposed(g2), x2)).T
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def fence(x, dtype):
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
  return by_platform(x, embedding.T, cpu=cpu,
                     default=functools.partial(product, "...i,io->...o"))


def transposed(a):
  """a with its last two axes swapped, as an array of its own (row-major) for a matmul.

  The barrier keeps XLA from folding the transpose back into the dot's dimensions. A
  16-bit transpose that XLA leaves as a layout change (column-major) makes XLA CPU upcast
  the dot to float32, since its fast matmul (YNNPACK) takes bfloat16 operands row-major
  only: `row_major` makes the transpose real.
  """
  swapped = a.swapaxes(-1, -2)
  if a.dtype.itemsize >= 4:
    return _BARRIER(swapped)
  return row_major(swapped)


def row_major(a):
  """a as a row-major array of its own, when 16-bit: XLA may keep a transpose as a layout
  change (a column-major operand), which makes XLA CPU upcast a bf16 matmul to float32.
  A reshape that a column-major layout cannot express makes the transpose a real copy; the
  barrier keeps it. The reshape splits the leading axis in two and keeps the others: a copy
  into a flat array costs XLA CPU 3-4x more (the weight gradients' transposes of the recipe's bf16
  step took 2-3% of it more; README, "Performance")."""
  if a.dtype.itemsize >= 4:
    return a
  lead, *rest = a.shape
  split = (2, lead // 2, *rest) if lead % 2 == 0 else (-1,)
  return _BARRIER(a.reshape(split)).reshape(a.shape)
