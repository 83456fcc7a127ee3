"""Ahead-of-time compilation of the sharded train step, and what the compiler says about it.

Training compiles its step before the loop (so the start-up report can show the memory it
needs and how long compiling took). `--compile_only --topology=v5e:2x4` compiles the same step
for a Cloud TPU slice on a machine without one -- JAX lowers against abstract TPU devices from
`libtpu` -- and estimates the step time with a roofline over the chip's peak FLOP/s and HBM
bandwidth. No communication time is modelled: the estimate is a lower bound.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax

from gpt2jax import errors, flops, parallel
from gpt2jax.steps import make_sharded_steps, validate_config

GB = 1e9  # bandwidths in decimal units, as chip specifications give them


class DoesNotFit(Exception):
  """The compiler found the step needs more device memory than there is."""


MEMORY_HINT = ("shard parameters and optimizer state with --config.mesh.fsdp=-1 "
               "--config.mesh.data=1, lower --config.train.batch_size or raise "
               "--config.train.grad_accum_steps, or recompute activations with "
               "--config.model.remat=True")


@dataclasses.dataclass
class CompiledStep:
  executable: Callable
  compile_seconds: float
  memory: dict[str, int] | None  # per device, from memory_analysis()
  cost: dict[str, float] | None  # per device, from cost_analysis()


def compile_step(jitted, mesh, *abstract_args) -> CompiledStep:
  """Lowers and compiles `jitted` for arguments given as ShapeDtypeStructs with shardings.

  Tracing under the mesh turns on the model's activation sharding constraints.
  """
  started = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = jitted.lower(*abstract_args)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" in str(e):
        raise DoesNotFit(str(e).strip().splitlines()[0]) from e
      raise
  seconds = time.perf_counter() - started
  return CompiledStep(compiled, seconds, _memory(compiled), _cost(compiled))


def compile_step_in_background(jitted, mesh, *abstract_args) -> concurrent.futures.Future:
  """compile_step on another thread (XLA compiles without holding the GIL); -> Future."""
  executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile-train-step")
  future = executor.submit(compile_step, jitted, mesh, *abstract_args)
  executor.shutdown(wait=False)
  return future


def _analysis(compiled, name: str):
  """compiled.memory_analysis() / cost_analysis(), or None where the backend has none."""
  try:
    return getattr(compiled, name)()
  except (NotImplementedError, RuntimeError):
    return None


def _memory(compiled) -> dict[str, int] | None:
  stats = _analysis(compiled, "memory_analysis")
  if stats is None:
    return None
  memory = {name: int(getattr(stats, f"{name}_size_in_bytes"))
            for name in ("argument", "output", "alias", "temp", "generated_code")}
  # Donated arguments are reused for the outputs (alias), so they count once.
  memory["total"] = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
                     + memory["generated_code"])
  return memory


def _cost(compiled) -> dict[str, float] | None:
  cost = _analysis(compiled, "cost_analysis")
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else None
  if not cost:
    return None
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def human_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  raise AssertionError("unreachable")


def human_flops(n: float) -> str:
  for unit in ("FLOP", "kFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP"):
    if abs(n) < 1000 or unit == "PFLOP":
      return f"{n:.3g} {unit}"
    n /= 1000
  raise AssertionError("unreachable")


@contextlib.contextmanager
def _stderr_shown_only_on_error():
  """libtpu prints warnings about the missing TPU host to fd 2 when it describes a topology;
  they are noise here, but worth showing if describing it fails."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      captured.seek(0)
      sys.stderr.write(captured.read().decode("utf-8", "replace"))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def memory_line(memory: dict[str, int] | None) -> str:
  if memory is None:
    return "compiled step memory: not reported by this backend"
  return (f"compiled step memory per device: {human_bytes(memory['total'])} "
          f"(arguments {human_bytes(memory['argument'])}, outputs "
          f"{human_bytes(memory['output'])}, of which {human_bytes(memory['alias'])} reuse "
          f"donated arguments, temporaries {human_bytes(memory['temp'])})")


def startup_lines(mesh, state: Any, compiled: CompiledStep) -> list[str]:
  """What training prints before its first step about devices, memory and compilation."""
  params_bytes = parallel.bytes_per_device(state.params)
  opt_bytes = parallel.bytes_per_device(state.opt_state)
  return [
      parallel.describe_mesh(mesh),
      f"per device: parameters {human_bytes(params_bytes)} + optimizer state "
      f"{human_bytes(opt_bytes)}",
      memory_line(compiled.memory),
      f"train step compiled in {compiled.compile_seconds:.1f} s",
  ]


def topology_devices(topology: str) -> list:
  """Abstract devices of a TPU slice such as 'v5e:2x4', 'v4:2x2x2' or 'v5p:2x2x1'."""
  # Only described, never run: other processes may use libtpu at the same time (libtpu
  # otherwise holds a machine-wide lock file while loaded).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies

    # v4 and v5p chips hold two TensorCores that JAX drives as one device ("megacore").
    chip_config = "megacore" if topology.split(":")[0] in ("v4", "v5p") else "default"
    with _stderr_shown_only_on_error():
      topo = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                          chip_config_name=chip_config)
  except Exception as e:  # libtpu missing, or a name libtpu does not know
    raise errors.UserError(
        f"Cannot describe TPU topology {topology!r}: {str(e).strip().splitlines()[0]}. "
        "Install libtpu (pip install -r requirements-tpu.txt) and name a topology as "
        "<generation>:<chips per dimension>, e.g. v5e:2x4, v4:2x2x2 or v5p:2x2x1.") from e
  return list(topo.devices)


def chip_of(device) -> flops.Chip | None:
  return flops.TPU_CHIPS.get(device.device_kind)


@dataclasses.dataclass
class Roofline:
  compute_seconds: float
  memory_seconds: float
  step_seconds: float
  mfu: float  # model FLOPs (6N + 12LTd per token) over the slice's peak in that time


def roofline(cost: dict[str, float], chip: flops.Chip, num_devices: int, devices_per_chip: int,
             model_flops_per_step: float) -> Roofline:
  """Step time if each chip ran at peak FLOP/s or peak HBM bandwidth, whichever binds."""
  flops_per_chip = cost["flops"] * devices_per_chip
  bytes_per_chip = cost["bytes_accessed"] * devices_per_chip
  compute = flops_per_chip / chip.peak_flops
  memory = bytes_per_chip / chip.hbm_bandwidth
  step = max(compute, memory)
  chips = num_devices / devices_per_chip
  return Roofline(compute, memory, step, model_flops_per_step / (step * chips * chip.peak_flops))


def devices_per_chip(devices) -> int:
  """TensorCores exposed as separate devices per chip (1 with megacore)."""
  chips = {tuple(getattr(d, "coords", (d.id,))) for d in devices}
  return max(1, len(devices) // max(len(chips), 1))


def does_not_fit_lines(topology: str, devices, mesh, error: DoesNotFit) -> list[str]:
  chip = chip_of(devices[0])
  where = (f" in the {human_bytes(chip.hbm_bytes / devices_per_chip(devices))} HBM of a "
           f"{chip.name} device" if chip else "")
  return [f"{topology}: {parallel.describe_mesh(mesh)}",
          f"does not fit{where}: {error}", f"to fit: {MEMORY_HINT}"]


def topology_report(topology: str, devices, mesh, compiled: CompiledStep, num_params: int,
                    state_bytes: dict[str, int], flops_per_step: float, has_loops: bool
                    ) -> list[str]:
  """The lines --compile_only prints for a TPU topology."""
  chip = chip_of(devices[0])
  per_chip = devices_per_chip(devices)
  lines = [f"compiled the train step for {topology}: {parallel.describe_mesh(mesh)}, "
           f"{len(devices) // per_chip} chips, in {compiled.compile_seconds:.1f} s",
           f"{num_params:,} parameters; per device: parameters "
           f"{human_bytes(state_bytes['params'])} + optimizer state "
           f"{human_bytes(state_bytes['opt_state'])}",
           memory_line(compiled.memory)]
  if chip is not None and compiled.memory is not None:
    hbm_per_device = chip.hbm_bytes / per_chip
    need = compiled.memory["total"]
    if need > hbm_per_device:
      lines.append(f"does not fit: needs {human_bytes(need)} per device but a {chip.name} "
                   f"{'core' if per_chip > 1 else 'chip'} has {human_bytes(hbm_per_device)} HBM")
    else:
      lines.append(f"fits: {need / hbm_per_device:.0%} of the {human_bytes(hbm_per_device)} HBM "
                   f"of a {chip.name} {'core' if per_chip > 1 else 'chip'}")
  if compiled.cost is not None and has_loops:
    lines.append("no FLOPs or roofline: XLA's cost analysis counts a loop body once, so with "
                 "model.scan_layers or train.grad_accum_steps > 1 it undercounts; compile "
                 "without them for the estimate")
  elif compiled.cost is not None:
    lines.append(f"per device and step: {human_flops(compiled.cost['flops'])}, "
                 f"{human_bytes(compiled.cost['bytes_accessed'])} accessed "
                 f"(model: {human_flops(flops_per_step)} per step in all)")
    if chip is not None:
      r = roofline(compiled.cost, chip, len(devices), per_chip, flops_per_step)
      lines.append(f"roofline on {chip.name} ({chip.peak_flops / 1e12:.0f} TFLOP/s, "
                   f"{chip.hbm_bandwidth / GB:.0f} GB/s per chip): step >= "
                   f"{r.step_seconds * 1e3:.3g} ms (compute {r.compute_seconds * 1e3:.3g} ms, "
                   f"memory {r.memory_seconds * 1e3:.3g} ms), MFU <= {r.mfu:.1%}; "
                   "communication not included")
  if chip is None:
    lines.append(f"no peak figures for {devices[0].device_kind!r}: no roofline estimate")
  return lines


def _vocab_size_for_compile(config, workdir: Path) -> int:
  """model.vocab_size when set (init_from sets it), else the workdir's tokenizer's when it has
  one, else config.tokenizer.vocab_size (a char vocabulary's true size is only known from the
  corpus)."""
  from gpt2jax import tokenizer as tokenizer_lib
  from gpt2jax.workdir import TOKENIZER_DIR

  if config.model.get("vocab_size", 0):
    return config.model.vocab_size
  if (workdir / TOKENIZER_DIR / tokenizer_lib.TOKENIZER_JSON).exists():
    tokenizer = tokenizer_lib.load_tokenizer(workdir / TOKENIZER_DIR)
    return tokenizer_lib.model_vocab_size(tokenizer, config.model)
  return config.tokenizer.vocab_size


def compile_only(config, workdir: Path, topology: str = "") -> list[str]:
  """Compiles the sharded train step -- for a TPU topology, or for this machine's devices --
  without data or training, and returns the memory, FLOPs and roofline report."""
  from gpt2jax import pretrained
  from gpt2jax.model import GPT, count_params

  config, _ = pretrained.resolve_config(config)
  devices = topology_devices(topology) if topology else jax.devices()
  mesh = parallel.make_mesh(config.mesh, devices)
  model_shape = validate_config(config, mesh)
  model = GPT(dataclasses.replace(model_shape,
                                  vocab_size=_vocab_size_for_compile(config, Path(workdir))))
  steps = make_sharded_steps(config, model, mesh)
  t, cfg = config.train, model.config
  try:
    compiled = compile_step(steps.train_step, mesh, steps.abstract_state,
                            steps.abstract_batch(t.batch_size, cfg.block_size))
  except DoesNotFit as e:
    return does_not_fit_lines(topology or devices[0].platform, devices, mesh, e)
  params = steps.abstract_state.params
  flops_per_step = t.batch_size * cfg.block_size * flops.gpt_flops_per_token(cfg, params)
  state_bytes = {"params": parallel.bytes_per_device(params),
                 "opt_state": parallel.bytes_per_device(steps.abstract_state.opt_state)}
  return topology_report(topology or devices[0].platform, devices, mesh, compiled,
                         count_params(params), state_bytes, flops_per_step,
                         has_loops=cfg.scan_layers or t.grad_accum_steps > 1)
