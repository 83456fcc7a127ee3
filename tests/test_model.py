import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax.errors import UserError
from gpt2jax.model import GPT, GPTConfig, KVCache, count_params

CONFIG = GPTConfig(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_embd=32)


def _apply(config):
  """Jitted forward (decoding steps of one shape compile once)."""
  model = GPT(config)
  return jax.jit(lambda params, tokens, cache=None: model.apply({"params": params}, tokens,
                                                                cache=cache))


def _init(config, batch=2, time=None):
  tokens = jax.random.randint(jax.random.key(1), (batch, time or config.block_size), 0,
                              config.vocab_size)
  params = jax.jit(GPT(config).init)(jax.random.key(0), tokens)["params"]
  return params, tokens


def test_logits_shape_and_dtype():
  params, tokens = _init(CONFIG)
  logits, cache = GPT(CONFIG).apply({"params": params}, tokens)
  assert logits.shape == (2, CONFIG.block_size, CONFIG.vocab_size)
  assert logits.dtype == jnp.float32 and cache is None


def test_lm_head_is_tied_to_token_embedding_unless_untied():
  params, _ = _init(CONFIG)
  assert "lm_head" not in params
  untied, _ = _init(GPTConfig(**{**CONFIG.__dict__, "tie_embeddings": False}))
  assert untied["lm_head"]["kernel"].shape == (CONFIG.n_embd, CONFIG.vocab_size)
  assert count_params(untied) == count_params(params) + CONFIG.n_embd * CONFIG.vocab_size


def test_gpt2_initialisation_scales_residual_projections():
  config = GPTConfig(vocab_size=61, block_size=24, n_layer=8, n_head=4, n_embd=128)
  params, _ = _init(config)
  assert np.std(params["h_0"]["mlp"]["c_fc"]["kernel"]) == pytest.approx(0.02, rel=0.05)
  assert np.std(params["h_0"]["mlp"]["c_proj"]["kernel"]) == pytest.approx(
      0.02 / np.sqrt(2 * 8), rel=0.05)


def test_changing_a_future_token_never_changes_earlier_logits():
  params, tokens = _init(CONFIG)
  apply = _apply(CONFIG)
  before, _ = apply(params, tokens)
  t = 10
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % CONFIG.vocab_size)
  after, _ = apply(params, changed)
  np.testing.assert_array_equal(before[:, :t], after[:, :t])
  assert not np.allclose(before[:, t:], after[:, t:])


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_decoding_matches_full_forward(scan_layers):
  config = GPTConfig(**{**CONFIG.__dict__, "scan_layers": scan_layers})
  params, tokens = _init(config)
  apply = _apply(config)
  full, _ = apply(params, tokens)
  cache = KVCache.create(config, tokens.shape[0])
  prefill, cache = apply(params, tokens[:, :7], cache)
  steps = [prefill]
  for t in range(7, config.block_size):
    logits, cache = apply(params, tokens[:, t:t + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)
  assert int(cache.index) == config.block_size


def test_left_padded_prompt_decodes_like_the_unpadded_one():
  params, tokens = _init(CONFIG, batch=1, time=9)
  apply = _apply(CONFIG)
  plain, _ = apply(params, tokens)
  padded = jnp.concatenate([jnp.zeros((1, 5), jnp.int32), tokens], axis=1)
  logits, _ = apply(params, padded, KVCache.create(CONFIG, 1, start=[5]))
  np.testing.assert_allclose(logits[:, 5:], plain, atol=1e-5, rtol=0)


def test_attention_weights_are_causal_and_normalised():
  params, tokens = _init(CONFIG)
  _, state = GPT(CONFIG).apply({"params": params}, tokens, mutable=["intermediates"])
  (weights,) = state["intermediates"]["h_1"]["attn"]["attention_weights"]
  weights = np.asarray(weights)  # [batch, heads, query, key]
  assert weights.shape == (2, CONFIG.n_head, CONFIG.block_size, CONFIG.block_size)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  assert np.all(np.triu(weights, k=1) == 0.0)


def _loss_and_grads(config, params, tokens, deterministic):
  def loss(params):
    logits, _ = GPT(config).apply({"params": params}, tokens, deterministic=deterministic,
                                  rngs={"dropout": jax.random.key(2)})
    return jnp.mean(logits**2)
  return jax.tree_util.tree_leaves(jax.jit(jax.value_and_grad(loss))(params))


def test_dropout_zero_trains_bit_for_bit_as_it_evaluates_and_dropout_does_not():
  params, tokens = _init(CONFIG)  # dropout 0
  for train, evaluate in zip(_loss_and_grads(CONFIG, params, tokens, False),
                             _loss_and_grads(CONFIG, params, tokens, True)):
    np.testing.assert_array_equal(train, evaluate)
  dropped = GPTConfig(**{**CONFIG.__dict__, "dropout": 0.1})
  train, evaluate = (_loss_and_grads(dropped, params, tokens, d)[0] for d in (False, True))
  assert train != evaluate


def test_bfloat16_compute_keeps_float32_params_and_logits():
  config = GPTConfig(**{**CONFIG.__dict__, "dtype": "bfloat16"})
  params, tokens = _init(config)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  logits, _ = GPT(config).apply({"params": params}, tokens)
  assert logits.dtype == jnp.float32
  reference, _ = GPT(CONFIG).apply({"params": params}, tokens)
  assert np.abs(logits - reference).max() < 0.1


def test_bfloat16_decodes_one_sequence_as_its_full_forward():
  """Catches a bfloat16 matrix-vector product (one sequence, one new token) that XLA CPU
  cannot run: it multiplies bf16 x bf16 -> f32 only as a YNNPACK matmul of 2 rows or more."""
  config = GPTConfig(**{**CONFIG.__dict__, "dtype": "bfloat16"})
  params, tokens = _init(config, batch=1)
  apply = _apply(config)
  full, _ = apply(params, tokens)
  prefill, cache = apply(params, tokens[:, :7], KVCache.create(config, 1))
  steps = [prefill]
  for t in range(7, 12):
    logits, cache = apply(params, tokens[:, t:t + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full[:, :12], atol=0.02, rtol=0)


def test_shape_errors_name_the_fix():
  with pytest.raises(UserError, match="n_embd=30 is not divisible by model.n_head=4"):
    GPTConfig(vocab_size=10, n_embd=30, n_head=4)
