"""Device mesh and its arithmetic (axis sizes, batch splits), parameter partitioning,
multi-host start-up and batch placement.

Parallelism is declared, not hand-written: `config.mesh` names the sizes of the mesh axes,
one rule table (`PARAM_AXES` + `LOGICAL_TO_MESH`) says how every parameter -- and, by the same
path, every optimizer-state leaf -- is laid out over them, and `jax.jit` with those shardings
lets XLA's SPMD partitioner insert the collectives.

  data   pure data parallelism: parameters replicated, batch rows split.
  fsdp   fully sharded data parallelism (ZeRO-3): batch rows split as well, and parameters,
         gradients and Adam moments split along their `embed` dimension; XLA all-gathers a
         layer's weights when it is used and reduce-scatters its gradients.

The batch dimension is split over both axes, so `data * fsdp` devices each take
`batch_size / (data * fsdp)` rows.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gpt2jax.errors import UserError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # batch rows are split over every device

# Logical names of each parameter's trailing dimensions, by a regex searched in its path
# ("h_0/attn/c_attn/kernel"). Searching the end of the path makes the same rules cover the
# optimizer state (".../mu/h_0/attn/c_attn/kernel") and layers stacked by scan (an extra
# leading "layers" dimension). Leaves no rule names (biases, LayerNorm, step counters) are
# small and replicated.
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"wte/embedding$", ("vocab", "embed")),
    (r"wpe/embedding$", ("position", "embed")),
    (r"attn/c_attn/kernel$", ("embed", "qkv")),
    (r"attn/c_proj/kernel$", ("qkv", "embed")),
    (r"mlp/c_fc/kernel$", ("embed", "mlp")),
    (r"mlp/c_proj/kernel$", ("mlp", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"(bias|scale)$", ("vector",)),
)
# The mesh axis each logical axis is split over; the others are replicated.
LOGICAL_TO_MESH = {"embed": "fsdp"}


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Axis sizes from config.mesh, with one -1 meaning "all the remaining devices"."""
  return resolve_mesh_shape({axis: int(mesh_config[axis]) for axis in MESH_AXES}, num_devices)


def resolve_mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """The mesh axis sizes with the one -1 ("the rest of the devices") filled in.

  Raises UserError unless the sizes multiply to exactly num_devices.
  """
  sizes = dict(axis_sizes)
  described = " x ".join(f"mesh.{name}={size}" for name, size in sizes.items())
  wildcards = [name for name, size in sizes.items() if size == -1]
  bad = [name for name, size in sizes.items() if size != -1 and size < 1]
  if bad or len(wildcards) > 1:
    raise UserError(f"{described}: each mesh size must be at least 1, and at most one may be -1 "
                    "(the rest of the devices).")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if wildcards and num_devices % fixed:
    raise UserError(f"{described}: the {num_devices} devices do not split into groups of "
                    f"{fixed}; choose sizes whose product divides {num_devices}.")
  if not wildcards and fixed != num_devices:
    raise UserError(f"{described} needs {fixed} devices, but there are {num_devices}: make the "
                    f"product {num_devices}, or set one size to -1 for the rest of the devices "
                    "(e.g. --config.mesh.data=-1).")
  if wildcards:
    sizes[wildcards[0]] = num_devices // fixed
  return sizes


def check_batch_divides(batch_size: int, data_parallel: int, *, grad_accum_steps: int = 1,
                        process_count: int = 1) -> None:
  """The global batch must split evenly into micro-batches, then over the batch-sharded devices.

  data_parallel: the number of shards of the batch axis (product of the mesh axes the batch is
  sharded over, e.g. data x fsdp).
  """
  if grad_accum_steps < 1:
    raise UserError(f"train.grad_accum_steps must be at least 1, got {grad_accum_steps}.")
  if batch_size % grad_accum_steps:
    raise UserError(f"train.batch_size={batch_size} is not divisible by "
                    f"train.grad_accum_steps={grad_accum_steps}: use a multiple of it.")
  micro_batch = batch_size // grad_accum_steps
  shards = math.lcm(data_parallel, process_count)
  if micro_batch % shards:
    per = f"micro-batch {micro_batch} (batch_size / grad_accum_steps)" \
        if grad_accum_steps > 1 else f"train.batch_size={batch_size}"
    suggestion = -(-micro_batch // shards) * shards * grad_accum_steps
    raise UserError(f"The {per} is not divisible by the {shards}-way data parallelism of the "
                    f"mesh: make it a multiple of {shards}, e.g. --config.train.batch_size="
                    f"{suggestion}.")


def make_mesh(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
  """The device mesh config.mesh describes, over `devices` (default: all devices).

  Axes are Auto: XLA chooses the collectives (Explicit axes reject FSDP matmuls here).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def logical_axes(name: str, ndim: int) -> tuple[str | None, ...]:
  """The logical axis of each dimension of the leaf at `name` (None: unnamed)."""
  for pattern, axes in PARAM_AXES:
    if re.search(pattern, name) and ndim >= len(axes):
      return (None,) * (ndim - len(axes)) + axes  # leading dims: layers stacked by scan
  return (None,) * ndim


def partition_spec(name: str, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Where each dimension of a leaf lives; a dimension the axis does not divide is replicated."""
  spec = []
  for size, logical in zip(shape, logical_axes(name, len(shape))):
    axis = LOGICAL_TO_MESH.get(logical)
    spec.append(axis if axis and size % mesh.shape[axis] == 0 else None)
  return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree of arrays (params, optimizer state or a whole TrainState)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, partition_spec(path_name(path), leaf.shape, mesh)),
      tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, time] arrays: rows split over every device, time kept whole."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings: targets for AOT lowering and checkpoint restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def check_batch_size(batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
  """Every micro-batch must split evenly over the devices (and processes) that share the batch."""
  check_batch_divides(batch_size, math.prod(mesh.shape[axis] for axis in BATCH_AXES),
                      grad_accum_steps=grad_accum_steps, process_count=jax.process_count())


def constrain_to_batch_axes(x: jax.Array) -> jax.Array:
  """Keeps an activation [batch, ...] split by rows over the mesh being compiled for.

  Left to itself, XLA may meet FSDP-sharded weights by resharding the activations along
  n_embd (all-to-alls; 4x the temporary memory of data parallelism, measured) instead of
  gathering each layer's weights. A no-op outside `jax.set_mesh` (sampling, tests).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  if x.shape[0] % math.prod(mesh.shape[axis] for axis in BATCH_AXES):
    return x
  return jax.lax.with_sharding_constraint(x, PartitionSpec(BATCH_AXES))


def place_batch(local_rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """The global batch from this process's rows (TrainBatches gives each process its own)."""
  global_shape = (local_rows.shape[0] * jax.process_count(), *local_rows.shape[1:])
  return jax.make_array_from_process_local_data(sharding, local_rows, global_shape)


def host_local(tree: Any) -> Any:
  """Arrays every process can compute with alone (e.g. to sample on process 0).

  With one process the arrays already are; with several this is a collective that every
  process must call, and it copies the full values to each host.
  """
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of a pytree of sharded arrays or ShapeDtypeStructs."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def describe_mesh(mesh: Mesh) -> str:
  devices = mesh.devices.flat
  first = next(iter(devices))
  kind = getattr(first, "device_kind", first.platform)
  axes = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
  processes = len({d.process_index for d in mesh.devices.flat})
  return (f"mesh {axes} over {mesh.devices.size} {kind} device(s) in {processes} "
          f"process(es)")


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Joins this process to a multi-process run, before any JAX computation.

  With a coordinator address (and the process count and id) the run is set up explicitly,
  e.g. on a GPU cluster or several processes on one machine. Without one, JAX detects the
  cluster itself where it can (all workers of a Cloud TPU pod slice, SLURM, Open MPI); where
  it finds none, this stays a single-process run.
  """
  if jax.distributed.is_initialized():
    return
  if coordinator_address or num_processes > 0 or process_id >= 0:
    if not (coordinator_address and num_processes > 0 and process_id >= 0):
      raise UserError(
          "A multi-process run needs all of --coordinator_address=HOST:PORT, "
          "--num_processes=N and --process_id=I (0 on the coordinator's host).")
    if process_id >= num_processes:
      raise UserError(f"--process_id={process_id} must be below "
                             f"--num_processes={num_processes}.")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return
  try:
    jax.distributed.initialize()
  except ValueError:
    pass  # no cluster detected: one process
