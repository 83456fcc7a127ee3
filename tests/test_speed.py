"""The speed machinery works (benchmarks never time anything in tests)."""

import platform

import pytest

from benchmarks import measure
from gpt2jax import metrics, runtime
from gpt2jax.model import count_params

TINY = measure.Shape("tiny", n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=2,
                     vocab_size=11)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_settings_are_applied_when_gpt2jax_is_imported():
  import gpt2jax  # noqa: F401

  assert runtime.tune_allocator() is True


def test_training_benchmark_reports_throughput_and_mfu():
  result = measure.train_throughput(TINY, steps=3, peak_flops=1e15)
  assert result["step_seconds"]["count"] == 3
  assert result["tokens_per_second"] == pytest.approx(
      TINY.batch_size * TINY.block_size / result["step_seconds"]["median"])
  assert 0 < result["mfu"] < 1
  low, high = result["tokens_per_second_range"]
  assert low <= result["tokens_per_second"] <= high


def test_flops_per_token_is_nanogpts_estimate():
  import jax
  import jax.numpy as jnp
  from gpt2jax.model import GPT

  config = TINY.model_config()
  params = GPT(config).init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
  n = count_params(params) - 16 * 32  # without the position embedding
  assert metrics.gpt_flops_per_token(config, params) == 6 * n + 12 * 1 * 16 * 32


@pytest.mark.parametrize("use_cache", [True, False])
def test_sampling_benchmark_generates_every_requested_token(use_cache):
  result = measure.sampling_speed(TINY, batch=2, new_tokens=6, use_cache=use_cache, repeats=1)
  assert result["tokens_per_second"] == pytest.approx(2 * 6 / result["seconds"]["median"])
