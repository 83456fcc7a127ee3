"""How much arithmetic a GPT step does, how much the devices could do, and the ratio (MFU).

FLOPs per token are counted as nanoGPT and the PaLM paper count them; the peaks are the
public dense bfloat16 figures of TPU chips (with their HBM, for aot's roofline) and GPUs. CPUs
have no entry: their runs report achieved TFLOP/s without an MFU.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from gpt2jax.model import count_params


def model_flops_per_token(non_embedding_params: int, n_layer: int, n_embd: int,
                          block_size: int) -> float:
  """Training FLOPs per token (forward and backward) as nanoGPT and the PaLM paper count
  them: 6 per parameter, plus 12 * layers * width * context for attention."""
  return 6.0 * non_embedding_params + 12.0 * n_layer * n_embd * block_size


def gpt_flops_per_token(model_config, params) -> float:
  """model_flops_per_token of a GPT, from its GPTConfig and (possibly abstract) parameters;
  N counts the parameters without the position embedding."""
  return model_flops_per_token(count_params(params, non_embedding=True), model_config.n_layer,
                               model_config.n_embd, model_config.block_size)


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip figures of a TPU generation (bf16 dense matmul peak)."""

  name: str
  peak_flops: float  # FLOP/s
  hbm_bandwidth: float  # bytes/s
  hbm_bytes: float
  devices: int = 1  # JAX devices per chip: v2 and v3 show each of their 2 cores as one


# Keyed by the device_kind JAX reports. Cloud TPU documentation, per chip.
TPU_CHIPS = {
    "TPU v2": Chip("v2", 45e12, 700e9, 16 * 2**30, devices=2),
    "TPU v3": Chip("v3", 123e12, 900e9, 32 * 2**30, devices=2),
    "TPU v4": Chip("v4", 275e12, 1228e9, 32 * 2**30),
    "TPU v5 lite": Chip("v5e", 197e12, 819e9, 16 * 2**30),
    "TPU v5": Chip("v5p", 459e12, 2765e9, 95 * 2**30),
    "TPU v6 lite": Chip("v6e", 918e12, 1640e9, 32 * 2**30),
}
# Dense bfloat16 peak FLOP/s of one GPU, by device_kind (the first name found in it counts).
GPU_PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("V100", 125e12), ("T4", 65e12),
)


def device_peak_flops(kind: str) -> float | None:
  """Dense bfloat16 peak FLOP/s of one JAX device of this kind; None when unknown (CPUs)."""
  if kind in TPU_CHIPS:
    return TPU_CHIPS[kind].peak_flops / TPU_CHIPS[kind].devices
  return next((flops for name, flops in GPU_PEAK_BF16_FLOPS if name in kind), None)


def peak_flops_per_second(device_kinds: Sequence[str]) -> float | None:
  """Summed bfloat16 peak of the devices; None when one is unknown (CPUs, for instance)."""
  peaks = [device_peak_flops(kind) for kind in device_kinds]
  if not peaks or None in peaks:
    return None
  return sum(peaks)


def utilization(tokens_per_second: float, flops_per_token: float, peak_flops: float | None
                ) -> dict:
  """Achieved model TFLOP/s, and model FLOPs utilization (MFU) when the peak is known."""
  achieved = tokens_per_second * flops_per_token
  out = {"model_tflops_per_second": achieved / 1e12}
  if peak_flops:
    out["mfu"] = achieved / peak_flops
  return out
