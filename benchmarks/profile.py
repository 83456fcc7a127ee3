"""Where a training step's time goes: a profile of the compiled step, by part of the model.

  python -m benchmarks.profile --shape=R      # the nanoGPT CPU recipe's model; also A, B, Bd, C, H
  python -m benchmarks.profile --shape=R --dtype=bfloat16   # bfloat16 matmul operands

Runs the jitted train step of a benchmark shape under jax.profiler, reads the trace back
(jax.profiler.ProfileData) and charges every moment of the steps' wall time to the
operations running at that moment: shared equally when two run at once, to "idle" when no
thread runs one. Each operation of the compiled step is named by its HLO metadata (the model
module it comes from, forward or backward), so the table reads like the model: attention,
MLP, LayerNorms, optimizer... The matrix multiplications of each part also get their FLOP
rate (their FLOPs over the time they ran, which is shared with the other thread at times).
Prints a table and writes benchmarks/results/profile-<shape>-<dtype>-<time>.json.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import tempfile
from pathlib import Path
from typing import Callable

from absl import app, flags, logging
import jax

from benchmarks import measure, peak, results

_SHAPE = flags.DEFINE_enum("shape", "R", list(measure.SHAPES), "The benchmark shape to profile.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "model.dtype: the matmuls' operand dtype.")
_STEPS = flags.DEFINE_integer("steps", 10, "Profiled steps (after two warm-up steps).")
_OUT = flags.DEFINE_string("out", str(measure.REPO / "benchmarks" / "results"),
                           "Where the JSON goes.")

# Trace events that are bookkeeping of the runtime, not operations of the step.
_NOT_OPS = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "end:")

# (part of the model, regex searched in the op_name metadata), the first match wins.
_PARTS = [
    ("attention: qkv projection (c_attn)", r"/attn/c_attn"),
    ("attention: output projection (c_proj)", r"/attn/c_proj"),
    ("attention: softmax(QK^T)V, head split/merge", r"/attn"),
    ("MLP: c_fc", r"/mlp/c_fc"),
    ("MLP: c_proj", r"/mlp/c_proj"),
    ("MLP: GELU", r"/mlp"),
    ("LayerNorms", r"/ln_"),
    ("embeddings, LM head", r"/(wte|wpe|lm_head)"),
    ("residual adds", r"GPT\._blocks"),
    ("other model ops", r"\(GPT\)"),
]


def part_of(op_name: str) -> str:
  """'jit(train_step)/transpose(jvp(GPT))/GPT._blocks/h_1/mlp/c_fc/...' -> 'MLP: c_fc, bwd'."""
  if "transpose(jvp" in op_name:
    direction = "bwd"
  elif "jvp(" in op_name:
    direction = "fwd"
  else:
    return "optimizer update, gradient norm"
  for part, pattern in _PARTS:
    if re.search(pattern, op_name):
      return f"{part}, {direction}"
  return f"loss (cross-entropy), {direction}"


# A dot in HLO text: its output shape, its left operand's name, the left contracting axes.
_DOT = re.compile(r"= \w+\[([\d,]*)\]\S* dot\(%?([^,)\s]+).*?lhs_contracting_dims=\{([\d,]*)\}")


def _dot_flops(text: str, scope: str | None = None) -> int:
  """FLOPs of the dots in `text` (a fused computation's HLO, or one instruction), their left
  operands' shapes looked up in `scope` (the text itself by default)."""
  scope = text if scope is None else scope
  flops = 0
  for m in _DOT.finditer(text):
    out_shape, lhs_name, contracting = m.groups()
    lhs = re.search("%" + re.escape(lhs_name) + r" = \w+\[([\d,]*)\]", scope)
    lhs_dims = [int(d) for d in lhs.group(1).split(",") if d]
    size = 1
    for d in (int(d) for d in out_shape.split(",") if d):
      size *= d
    for axis in (int(a) for a in contracting.split(",") if a):
      size *= lhs_dims[axis]
    flops += 2 * size
  return flops


@dataclasses.dataclass
class Op:
  part: str
  dot_flops: int


_INSTRUCTION = re.compile(
    r"^\s+(?:ROOT )?%(\S+) = .*?(?:calls=%(\S+?),.*?)?op_name=\"([^\"]*)\"", re.M)


def ops_of(hlo_text: str) -> dict[str, Op]:
  """Each instruction of the optimized HLO -> its part of the model and its matmul FLOPs."""
  bodies = {m.group(1): m.group(2) for m in
            re.finditer(r"^%?(\S+) \(.*?\) -> .*? \{\n(.*?)\n\}", hlo_text, re.M | re.S)}
  # Instructions inside fused computations run (and are traced) as their fusion.
  fused = set(re.findall(r" fusion\(.*?calls=%?([\w.\-]+)", hlo_text))
  inside_fusions = {name for computation in fused for name in
                    re.findall(r"^\s+(?:ROOT )?%(\S+) = ", bodies.get(computation, ""), re.M)}
  ops = {}
  for m in _INSTRUCTION.finditer(hlo_text):
    name, called, op_name = m.groups()
    if called:
      flops = _dot_flops(bodies.get(called, ""))
    elif name in inside_fusions:
      flops = 0  # counted with its fusion
    else:
      flops = _dot_flops(m.group(0), scope=hlo_text)  # a dot that XLA left unfused
    ops[name] = Op(part_of(op_name), flops)
  return ops


def wall_shares(events, windows, part: Callable[[str], str]):
  """events: (start_ns, end_ns, name) on all threads; windows: (start_ns, end_ns) of the steps
  -> ({part: ns}, idle ns).

  Sweeps the steps' timeline: each interval's length goes to the operations running in it,
  split equally; an interval inside a step where none runs goes to idle.
  """
  share = collections.Counter()
  points = sorted({p for start, end, _ in events for p in (start, end)}
                  | {p for window in windows for p in window})
  events, windows = sorted(events), sorted(windows)
  running, next_event, window, idle = [], 0, 0, 0
  for a, b in zip(points, points[1:]):
    while next_event < len(events) and events[next_event][0] <= a:
      running.append(events[next_event])
      next_event += 1
    running = [e for e in running if e[1] > a]
    while window < len(windows) and windows[window][1] <= a:
      window += 1
    if window == len(windows) or windows[window][0] > a:
      continue  # between steps: the host, not the step
    if not running:
      idle += b - a
      continue
    for _, _, name in running:
      share[part(name)] += (b - a) / len(running)
  return share, idle


def profile(shape: measure.Shape, steps: int) -> dict:
  state, step, batches = measure.train_setup(shape)
  compiled = step.lower(state, batches[0]).compile()
  for i in range(2):
    state, metrics = compiled(state, batches[i])
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for i in range(steps):
      state, metrics = compiled(state, batches[i % 2])
      jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    trace = next(Path(trace_dir).rglob("*.xplane.pb"))
    data = jax.profiler.ProfileData.from_file(str(trace))
    events, windows = [], []
    for plane in data.planes:
      for line in plane.lines:
        for event in line.events:
          if event.name.startswith("ThunkExecutor::Execute (wait"):  # a whole step
            windows.append((event.start_ns, event.start_ns + event.duration_ns))
          elif "XLA" in line.name and not event.name.startswith(_NOT_OPS):
            events.append((event.start_ns, event.start_ns + event.duration_ns, event.name))
  ops = ops_of(compiled.as_text())
  part = lambda name: ops[name].part if name in ops else "unnamed"
  share, idle = wall_shares(events, windows, part)
  # Each operation's own running time (busy), and that of the matmuls with their FLOPs.
  busy, flops, matmul_ns = collections.Counter(), collections.Counter(), collections.Counter()
  for start, end, name in events:
    busy[part(name)] += end - start
    if name in ops and ops[name].dot_flops:
      flops[part(name)] += ops[name].dot_flops
      matmul_ns[part(name)] += end - start
  parts = [{"part": part, "ms_per_step": share[part] / steps / 1e6,
            "busy_ms_per_step": busy[part] / steps / 1e6,
            "matmul_ms_per_step": matmul_ns[part] / steps / 1e6,
            "matmul_gflops_per_second": (flops[part] / matmul_ns[part] if flops[part] else None)}
           for part in sorted(share, key=share.get, reverse=True)]
  return {"shape": dataclasses.asdict(shape), "steps": steps,
          "step_ms": sum(end - start for start, end in windows) / steps / 1e6,
          "idle_ms_per_step": idle / steps / 1e6, "parts": parts,
          "matmul_gflop_per_step": sum(flops.values()) / steps / 1e9}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  shape = dataclasses.replace(measure.SHAPES[_SHAPE.value], dtype=_DTYPE.value)
  result = profile(shape, _STEPS.value)
  result["peak_gflops_per_second"] = peak.device_peak().flops_per_second / 1e9
  print(f"shape {shape.name}: {shape}\nstep {result['step_ms']:.1f} ms (mean of "
        f"{result['steps']} profiled steps); matrix multiplications "
        f"{result['matmul_gflop_per_step']:.2f} GFLOP per step; device peak "
        f"{result['peak_gflops_per_second']:.0f} GFLOP/s\n")
  print(f"| {'part of the step':<52} | {'ms/step':>8} | {'share':>6} | matmuls: ms, GFLOP/s")
  print(f"|{'-' * 54}|{'-' * 10}|{'-' * 8}|---------------------")
  total = sum(p["ms_per_step"] for p in result["parts"]) + result["idle_ms_per_step"]
  rows = result["parts"] + [{"part": "idle (no operation running)",
                             "ms_per_step": result["idle_ms_per_step"],
                             "matmul_gflops_per_second": None}]
  for p in sorted(rows, key=lambda p: -p["ms_per_step"]):
    rate = p["matmul_gflops_per_second"]
    matmuls = f"{p['matmul_ms_per_step']:.2f} ms, {rate:.0f} GFLOP/s" if rate else ""
    print(f"| {p['part']:<52} | {p['ms_per_step']:8.2f} | {p['ms_per_step'] / total:6.1%} | "
          f"{matmuls}")
  path = results.write(result, _OUT.value, f"profile-{shape.name}-{shape.dtype}")
  print(f"\nwrote {path}")


if __name__ == "__main__":
  app.run(main)
