"""Peak float32/bfloat16 throughput of the device, for MFU.

Accelerators: the table of published dense bfloat16 peaks in gpt2jax.flops (the one training
uses for its MFU). CPU: there is no useful published number (it depends on cores, clocks and
the BLAS), so we measure a large jitted matmul.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax.flops import peak_flops_per_second


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
  table = peak_flops_per_second([d.device_kind for d in jax.local_devices()])
  if table:
    return Peak(table, f"table: {kind} bfloat16 peak x {jax.local_device_count()}, "
                       f"{table / 1e12:.0f} TFLOP/s")
  flops = measured_matmul_flops(8192, repeats=5) * jax.local_device_count()
  return Peak(flops, f"measured ({kind} is not in the table): 8192^2 float32 matmul")
