"""gpt2jax.kernels: each fast path against a plain reference, values and gradients; which path
runs for which platform, dropout and cache; dropout's rate and mask; the cache's write."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax import kernels


def _normal(*shapes, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return [jax.random.normal(key, shape) for key, shape in zip(keys, shapes)]


def _reference_attention(q, k, v):
  """Causal softmax attention by jax, in gpt2jax's [batch, heads, time, head_dim] layout."""
  out = jax.nn.dot_product_attention(*(x.swapaxes(1, 2) for x in (q, k, v)), is_causal=True)
  return out.swapaxes(1, 2)


def _assert_same_values_and_gradients(fn, reference, args, atol=1e-5, rtol=1e-7):
  cotangent = _normal(jax.eval_shape(reference, *args).shape, seed=9)[0]
  np.testing.assert_allclose(fn(*args), reference(*args), atol=atol, rtol=rtol)
  argnums = tuple(range(len(args)))
  grads = jax.grad(lambda *a: jnp.sum(fn(*a) * cotangent), argnums)(*args)
  want = jax.grad(lambda *a: jnp.sum(reference(*a) * cotangent), argnums)(*args)
  for got, expected in zip(grads, want):
    np.testing.assert_allclose(got, expected, atol=atol, rtol=rtol)


# ---- Dense layers --------------------------------------------------------------------------

@pytest.mark.parametrize("d_in, d_out", [(8, 24), (24, 8)])  # both branches of the gradient
def test_linear_matches_a_plain_dot_with_gradients(d_in, d_out):
  x, kernel = _normal((2, 5, d_in), (d_in, d_out))
  _assert_same_values_and_gradients(kernels.linear, jnp.dot, (x, kernel))


def test_dense_has_nn_dense_parameters_and_result():
  x = _normal((2, 5, 8))[0]
  init = nn.initializers.normal(0.02)
  ours = kernels.Dense(16, True, jnp.float32, init)
  params = ours.init(jax.random.key(0), x)
  flax_dense = nn.Dense(16, kernel_init=init)
  assert (jax.tree_util.tree_map(jnp.shape, params)
          == jax.tree_util.tree_map(jnp.shape, flax_dense.init(jax.random.key(0), x)))
  params = jax.tree_util.tree_map(lambda p: p + 0.5, params)  # a bias that is not zero
  np.testing.assert_allclose(ours.apply(params, x), flax_dense.apply(params, x), atol=1e-6)


def test_heads_dense_is_a_dense_over_the_concatenated_heads():
  y = _normal((2, 3, 5, 4))[0]  # [batch, heads, time, head_dim]
  init = nn.initializers.normal(0.5)
  params = kernels.HeadsDense(7, True, jnp.float32, init).init(jax.random.key(0), y)
  params = jax.tree_util.tree_map(lambda p: p + 0.5, params)
  assert params["params"]["kernel"].shape == (12, 7)
  concatenated = y.transpose(0, 2, 1, 3).reshape(2, 5, 12)  # [batch, time, heads * head_dim]
  np.testing.assert_allclose(
      kernels.HeadsDense(7, True, jnp.float32, init).apply(params, y),
      nn.Dense(7).apply(params, concatenated), atol=1e-5)


@pytest.mark.parametrize("x_shape, kernel_shape", [
    ((2, 5, 8), (8, 24)), ((2, 5, 24), (24, 8)),  # both branches of the CPU gradient
    ((1, 1, 16), (16, 24)),  # one row: decoding one token of one sequence
    ((3, 4), (4, 1)), ((3, 4), (4, 5)),  # one column; every dimension tiny
])
def test_bfloat16_linear_runs_in_every_shape_with_float32_results_and_kernel_gradient(
    x_shape, kernel_shape):
  """Catches a bf16 product XLA CPU cannot run (bf16 x bf16 -> f32 outside YNNPACK), a bf16
  result, or a kernel gradient rounded to bf16."""
  x, kernel = _normal(x_shape, kernel_shape)
  fn = jax.jit(lambda x, k: kernels.linear(x, k, jnp.bfloat16))
  assert fn(x, kernel).dtype == jnp.float32
  reference = lambda x, k: jnp.dot(x.astype(jnp.bfloat16).astype(jnp.float32),
                                   k.astype(jnp.bfloat16).astype(jnp.float32))
  _assert_same_values_and_gradients(fn, reference, (x, kernel), atol=0.05, rtol=0.02)
  cotangent = _normal((*x_shape[:-1], kernel_shape[1]), seed=5)[0]
  d_kernel = jax.grad(lambda k: jnp.sum(fn(x, k) * cotangent))(kernel)
  assert d_kernel.dtype == jnp.float32
  assert not np.array_equal(d_kernel, d_kernel.astype(jnp.bfloat16).astype(jnp.float32))


def test_bfloat16_heads_dense_matches_float32_with_float32_parameter_gradients():
  y = _normal((2, 3, 5, 4))[0].astype(jnp.bfloat16)
  layer = lambda dtype: kernels.HeadsDense(7, True, dtype, nn.initializers.normal(0.5))
  params = layer(jnp.float32).init(jax.random.key(0), y)
  loss = lambda dtype: lambda p: jnp.sum(layer(dtype).apply(p, y) ** 2)
  assert layer(jnp.bfloat16).apply(params, y).dtype == jnp.float32
  grads = jax.grad(loss(jnp.bfloat16))(params)
  want = jax.grad(loss(jnp.float32))(params)
  for got, expected in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, atol=0.01 * float(jnp.abs(expected).max()))


# ---- Attention -----------------------------------------------------------------------------

@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_chunked_causal_attention_matches_reference_values_and_gradients(chunks):
  q, k, v = _normal((2, 3, 32, 8), (2, 3, 32, 8), (2, 3, 32, 8))
  _assert_same_values_and_gradients(
      lambda *a: kernels.causal_attention(*a, chunks), _reference_attention, (q, k, v))


class _Attend(nn.Module):
  """kernels.attention inside a module, as the model calls it (its dropout is a submodule)."""

  options: dict

  @nn.compact
  def __call__(self, q, k, v, past=None, mask=None):
    return kernels.attention(q, k, v, past=past, mask=mask, **self.options)


def _attend(q, k, v, past=None, mask=None, seed=0, **options):
  return _Attend(options).apply({}, q, k, v, past, mask,
                                rngs={"dropout": jax.random.key(seed)})


@pytest.mark.parametrize("options", [
    dict(),  # the fast causal kernel
    dict(return_weights=True),  # the softmax weights made whole
    dict(dropout_rate=0.2, deterministic=True),  # evaluation: dropout off, fast kernel
])
def test_attention_without_a_cache_matches_reference_values_and_gradients(options):
  q, k, v = _normal((2, 3, 64, 8), (2, 3, 64, 8), (2, 3, 64, 8))
  _assert_same_values_and_gradients(lambda *a: _attend(*a, **options)[0],
                                    _reference_attention, (q, k, v))


def test_returned_weights_are_causal_and_give_the_output():
  q, k, v = _normal((2, 3, 16, 8), (2, 3, 16, 8), (2, 3, 16, 8))
  out, weights = _attend(q, k, v, return_weights=True)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
  assert np.all(np.triu(np.asarray(weights), k=1) == 0.0)
  np.testing.assert_allclose(out, jnp.einsum("bhqk,bhkd->bhqd", weights, v), atol=1e-6)
  assert _attend(q, k, v)[1] is None


def test_attention_over_a_cache_equals_causal_attention_over_the_whole_sequence():
  """The first 10 tokens' keys sit in a 16-slot cache, the next 6 are new."""
  q, k, v = _normal((2, 3, 16, 8), (2, 3, 16, 8), (2, 3, 16, 8))
  slots = 16
  cache_k = jnp.zeros((2, 3, slots, 8)).at[:, :, :10].set(k[:, :, :10])
  cache_v = jnp.zeros((2, 3, slots, 8)).at[:, :, :10].set(v[:, :, :10])
  earlier = (jnp.arange(slots) < 10)[None, None, None, :]  # [batch, 1, 1, slots]
  causal = jnp.tril(jnp.ones((6, 6), bool))[None, None]
  out, _ = _attend(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:],
                   past=(cache_k, cache_v, earlier), mask=causal)
  np.testing.assert_allclose(out, _reference_attention(q, k, v)[:, :, 10:], atol=1e-5)


def test_attention_weights_dropout_drops_weights_only_while_training():
  q, k, v = _normal((2, 3, 64, 8), (2, 3, 64, 8), (2, 3, 64, 8))
  plain, _ = _attend(q, k, v)
  dropped, _ = _attend(q, k, v, dropout_rate=0.5, deterministic=False)
  again, _ = _attend(q, k, v, dropout_rate=0.5, deterministic=False)
  other, _ = _attend(q, k, v, dropout_rate=0.5, deterministic=False, seed=1)
  assert not np.allclose(dropped, plain, atol=1e-3)
  np.testing.assert_array_equal(dropped, again)  # the mask comes from the dropout rng
  assert not np.allclose(dropped, other, atol=1e-3)
  # With every value 1 each output is the sum of its kept weights, rescaled: 1 on average.
  ones, _ = _attend(q, k, jnp.ones_like(v), dropout_rate=0.5, deterministic=False)
  assert abs(float(jnp.mean(ones)) - 1) < 0.02 and float(jnp.std(ones)) > 0.1


@pytest.mark.parametrize("options, path", [
    (dict(), "causal_attention"),
    (dict(dropout_rate=0.2, deterministic=True), "causal_attention"),
    (dict(dropout_rate=0.2, deterministic=False), "causal_attention_dropout"),
    (dict(return_weights=True), None),
    (dict(return_weights=True, dropout_rate=0.2, deterministic=False), None),
])
def test_attention_takes_a_fast_kernel_exactly_when_nothing_needs_the_weights(
    monkeypatch, options, path):
  calls = []
  monkeypatch.setattr(kernels, "causal_attention",
                      lambda *a: calls.append("causal_attention") or _reference_attention(*a))
  monkeypatch.setattr(kernels, "causal_attention_dropout", lambda q, k, v, *_: (
      calls.append("causal_attention_dropout") or _reference_attention(q, k, v)))
  q, k, v = _normal((1, 2, 32, 8), (1, 2, 32, 8), (1, 2, 32, 8))
  _attend(q, k, v, **options)
  assert calls == ([path] if path else [])


def _whole_masks(masks, time):
  """The chunk masks of kernels.dropout_masks as one [batch, heads, time, time] mask."""
  return jnp.concatenate([jnp.pad(m, ((0, 0), (0, 0), (0, 0), (0, time - m.shape[3])))
                          for m in masks], axis=2)


def _reference_dropout_attention(q, k, v, keep, rate):
  """Causal attention with the weights dropped by `keep`, by plain jax ops."""
  threshold = round((1 - rate) * 256)
  time = q.shape[2]
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
  scores = jnp.where(jnp.tril(jnp.ones((time, time), bool)), scores, -jnp.inf)
  weights = jnp.where(keep, jax.nn.softmax(scores, axis=-1) * 256 / threshold, 0.0)
  return jnp.einsum("bhqk,bhkd->bhqd", weights, v)


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_attention_dropout_kernel_matches_a_reference_with_its_mask_values_and_gradients(
    chunks):
  q, k, v = _normal((2, 3, 64, 8), (2, 3, 64, 8), (2, 3, 64, 8))
  key, rate = jax.random.key(3), 0.3
  keep = _whole_masks(kernels.dropout_masks(key, q.shape, chunks, round(0.7 * 256)), 64)
  _assert_same_values_and_gradients(
      lambda *a: kernels.causal_attention_dropout(*a, key, rate, chunks),
      lambda *a: _reference_dropout_attention(*a, keep, rate), (q, k, v))


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5])
def test_attention_dropout_keeps_weights_at_its_rate_each_scaled_exactly(rate):
  """With the values the identity (head_dim = time), the output is the dropped weights."""
  time = 128
  q, k = _normal((4, 4, time, time), (4, 4, time, time))
  v = jnp.broadcast_to(jnp.eye(time), q.shape)
  dropped = np.asarray(kernels.causal_attention_dropout(q, k, v, jax.random.key(0), rate))
  weights = np.asarray(_reference_dropout_attention(q, k, v, True, 0.0))  # no dropout
  visible = np.broadcast_to(np.tril(np.ones((time, time), bool)), q.shape)
  kept = dropped[visible] != 0
  assert abs(1 - kept.mean() - rate) < 0.01
  scale = 256 / round((1 - rate) * 256)
  np.testing.assert_allclose(dropped[visible][kept], weights[visible][kept] * scale,
                             rtol=1e-5)
  assert (dropped[~visible] == 0).all()


class _AttendTwice(nn.Module):
  """Two attention calls in one module, as two layers of the model: each its own rng."""

  @nn.compact
  def __call__(self, q, k, v):
    options = dict(dropout_rate=0.5, deterministic=False)
    return (kernels.attention(q, k, v, **options)[0], kernels.attention(q, k, v, **options)[0])


def test_attention_dropout_masks_differ_across_rngs_and_layers():
  q, k, v = _normal((2, 3, 64, 8), (2, 3, 64, 8), (2, 3, 64, 8))
  apply = lambda seed: _AttendTwice().apply({}, q, k, v, rngs={"dropout": jax.random.key(seed)})
  first, second = apply(0)
  again, _ = apply(0)
  other, _ = apply(1)
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, second, atol=1e-3)
  assert not np.allclose(first, other, atol=1e-3)
  masks = kernels.dropout_masks(jax.random.key(0), (2, 3, 128, 8), 4, 128)
  assert not any(np.array_equal(masks[i][..., :32], masks[i + 1][..., :32]) for i in range(3))


def _exported_text(fn, platform, *args):
  return jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_each_platform_gets_its_own_attention_and_matmul_gradient(platform):
  q, k, v = _normal((1, 2, 128, 8), (1, 2, 128, 8), (1, 2, 128, 8))
  forward = _exported_text(kernels.causal_attention, platform, q, k, v)
  # CPU: 4 query chunks, each with two matmuls; elsewhere: one fused attention, two matmuls.
  assert forward.count("stablehlo.dot_general") == (8 if platform == "cpu" else 2)
  x, kernel = _normal((4, 16), (16, 32))
  backward = _exported_text(jax.grad(lambda x, w: jnp.sum(kernels.linear(x, w)), (0, 1)),
                            platform, x, kernel)
  assert ("optimization_barrier" in backward) == (platform == "cpu")
  dropped = _exported_text(
      lambda *a: kernels.causal_attention_dropout(*a, jax.random.key(0), 0.2), platform,
      q, k, v)
  assert dropped.count("stablehlo.dot_general") == (8 if platform == "cpu" else 2)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_a_function_traced_for_a_platform_holds_that_platforms_path_only(platform):
  """kernels.traced_for: catches a kernel that still traces every platform's path under it
  (platform_dependent's platform_index in the jaxpr), or that takes another platform's."""
  q, k, v = _normal((1, 2, 128, 8), (1, 2, 128, 8), (1, 2, 128, 8))
  loss = lambda q, k, v: jnp.sum(kernels.causal_attention(q, k, v)
                                 + kernels.causal_attention_dropout(q, k, v, jax.random.key(0),
                                                                    0.2))
  step = lambda q, k, v, w: (jax.grad(loss)(q, k, v), jax.grad(
      lambda w: jnp.sum(kernels.linear(q, w) + kernels.tied_logits(q, w.T, jnp.bfloat16)))(w))
  args = (q, k, v, _normal((8, 16))[0])
  assert "platform_index" in str(jax.make_jaxpr(step)(*args))
  traced = kernels.traced_for(platform, step)
  assert "platform_index" not in str(jax.make_jaxpr(traced)(*args))
  forward = _exported_text(kernels.traced_for(platform, kernels.causal_attention), platform,
                           q, k, v)
  assert forward.count("stablehlo.dot_general") == (8 if platform == "cpu" else 2)
  assert "platform_index" in str(jax.make_jaxpr(step)(*args))  # the platform was unset again


def test_chunk_count_skips_the_upper_triangle_without_tiny_chunks():
  assert [kernels.attention_chunks(t) for t in (64, 96, 128, 62, 30)] == [2, 2, 4, 1, 1]


# ---- Dropout -------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5])
def test_dropout_drops_at_its_rate_and_keeps_the_expected_value(rate):
  x = jnp.ones((64, 32, 256))
  apply = lambda seed: kernels.Dropout(rate).apply({}, x, False,
                                                   rngs={"dropout": jax.random.key(seed)})
  y, other = np.asarray(apply(0)), np.asarray(apply(1))
  kept = y != 0
  assert abs(1 - kept.mean() - rate) < 0.01
  assert np.allclose(y[kept], 256 / round((1 - rate) * 256))  # scaled by the rounded keep rate
  assert abs(y.mean() - 1) < 0.01
  assert (other != y).any()  # another key, another mask
  # Neighbouring elements share a 32-bit draw but not a decision.
  assert abs(np.mean(kept[..., 0::4] == kept[..., 1::4]) - ((1 - rate)**2 + rate**2)) < 0.01
  assert (kernels.Dropout(rate).apply({}, x, True) == x).all()


def test_dropout_of_a_last_axis_not_a_multiple_of_four_still_drops():
  x = jnp.ones((64, 30))
  y = np.asarray(kernels.Dropout(0.5).apply({}, x, False, rngs={"dropout": jax.random.key(0)}))
  assert abs((y == 0).mean() - 0.5) < 0.05
  assert np.allclose(y[y != 0], 2.0)


# ---- KV cache ------------------------------------------------------------------------------

def test_cache_update_writes_the_new_slots_and_keeps_the_others():
  cache_k, cache_v, k, v = _normal((2, 3, 16, 8), (2, 3, 16, 8), (2, 3, 4, 8), (2, 3, 4, 8))
  new_k, new_v = kernels.cache_update((cache_k, cache_v), k, v, jnp.int32(5),
                                      after=jnp.zeros((2, 3, 4, 8)))
  for new, old, written in ((new_k, cache_k, k), (new_v, cache_v, v)):
    np.testing.assert_array_equal(new[:, :, 5:9], written)
    np.testing.assert_array_equal(new[:, :, :5], old[:, :, :5])
    np.testing.assert_array_equal(new[:, :, 9:], old[:, :, 9:])


def test_decoding_token_by_token_through_the_cache_equals_the_full_forward():
  """Each step attends to the cache (read) and then writes its keys (cache_update)."""
  q, k, v = _normal((1, 2, 12, 8), (1, 2, 12, 8), (1, 2, 12, 8))
  cache = (jnp.zeros((1, 2, 12, 8)), jnp.zeros((1, 2, 12, 8)))

  @jax.jit
  def step(cache, t):
    one = lambda x: jax.lax.dynamic_slice_in_dim(x, t, 1, axis=2)
    earlier = (jnp.arange(12) < t)[None, None, None, :]
    out, _ = _attend(one(q), one(k), one(v), past=(*cache, earlier),
                     mask=jnp.ones((1, 1, 1, 1), bool))
    return out, kernels.cache_update(cache, one(k), one(v), t, after=out)

  outputs = []
  for t in range(12):
    out, cache = step(cache, jnp.int32(t))
    outputs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=2), _reference_attention(q, k, v),
                             atol=1e-5)
