"""gpt2jax.flops: FLOPs per token, the devices' peak, and MFU."""

import jax
import jax.numpy as jnp
import pytest

from gpt2jax import flops
from gpt2jax.model import GPT, GPTConfig, count_params


def test_flops_per_token_is_nanogpts_count():
  # 6 per non-embedding parameter (forward and backward) + 12 * layers * width * context.
  assert flops.model_flops_per_token(1000, 2, 16, 8) == 6000 + 12 * 2 * 16 * 8
  config = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)
  params = jax.eval_shape(
      lambda: GPT(config).init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])
  without_positions = count_params(params) - 16 * 32
  assert flops.gpt_flops_per_token(config, params) == pytest.approx(
      6 * without_positions + 12 * 2 * 32 * 16)


def test_peak_is_summed_over_devices_and_unknown_for_cpus():
  assert flops.peak_flops_per_second(["TPU v4"] * 4) == 4 * 275e12
  assert flops.peak_flops_per_second(["TPU v3"] * 8) == 4 * 123e12  # 2 cores per chip
  assert flops.peak_flops_per_second(["NVIDIA H100 80GB HBM3"]) == 989e12
  assert flops.peak_flops_per_second(["NVIDIA H100 PCIe"]) == 756e12  # not the SXM figure
  assert flops.peak_flops_per_second(["cpu"]) is None
  assert flops.peak_flops_per_second(["TPU v4", "cpu"]) is None  # no partial sums


def test_mfu_only_where_the_peak_is_known():
  assert flops.utilization(1e6, 6e6, 4 * 275e12) == pytest.approx(
      {"model_tflops_per_second": 6.0, "mfu": 6e12 / (4 * 275e12)})
  assert flops.utilization(1e6, 6e6, None) == {"model_tflops_per_second": 6.0}
