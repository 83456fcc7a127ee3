"""Peak float32/bfloat16 throughput of the device, for MFU.

Accelerators: a table of published dense peaks per chip. CPU: there is no useful published
number (it depends on cores, clocks and the BLAS), so we measure a large jitted matmul.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense peak TFLOP/s per chip (bfloat16; float32 on GPUs via TF32 is not used by default).
ACCELERATOR_PEAK_TFLOPS = {
    "TPU v2": 45.0,
    "TPU v3": 123.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v5": 459.0,  # v5p
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,  # v6e (Trillium)
    "TPU v6e": 918.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA L4": 121.0,
    "Tesla V100-SXM2-16GB": 125.0,
    "Tesla T4": 65.0,
}


@dataclasses.dataclass
class Peak:
  flops_per_second: float  # whole process: per device times local devices
  source: str  # where the number comes from, printed with the results


def measured_matmul_flops(size: int = 2048, repeats: int = 10) -> float:
  """Best-of-repeats float32 FLOP/s of a jitted size x size matmul on the default device."""
  a = jnp.ones((size, size), jnp.float32)
  b = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size**3 / float(np.min(times))


def device_peak() -> Peak:
  device = jax.devices()[0]
  if device.platform == "cpu":
    flops = measured_matmul_flops()
    return Peak(flops, f"measured: best jitted 2048x2048 float32 matmul, {flops / 1e9:.0f} GFLOP/s")
  kind = device.device_kind
  for name, tflops in ACCELERATOR_PEAK_TFLOPS.items():
    if kind.startswith(name):
      total = tflops * 1e12 * jax.local_device_count()
      return Peak(total, f"table: {kind} {tflops:.0f} TFLOP/s x {jax.local_device_count()}")
  flops = measured_matmul_flops(8192, repeats=5) * jax.local_device_count()
  return Peak(flops, f"measured ({kind} is not in the table): 8192^2 float32 matmul")
