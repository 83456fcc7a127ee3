"""Process-level settings that make JAX fast, applied once when gpt2jax is imported.

Compilation cache: every entry point (train, sample, evaluate, benchmarks) compiles its steps
on start, 5-15 s for a train step on a laptop CPU. JAX's persistent cache keeps the compiled
executables on disk, so running the same programs again (resuming, sampling, a second run with
the same settings) loads them instead. Default directory: $XDG_CACHE_HOME/gpt2jax/xla (else
~/.cache/gpt2jax/xla); GPT2JAX_COMPILATION_CACHE=<dir> moves it, =off turns it off, and a
cache directory already given to JAX (JAX_COMPILATION_CACHE_DIR) is left alone. Programs that
took at least _CACHE_MIN_COMPILE_SECONDS to compile are kept (op-by-op dispatches are not).

Allocator: the compiled training step needs a large temporary buffer (hundreds of MB) at every
call. glibc serves blocks that large with mmap and returns them with munmap, so each step pays
tens of thousands of page faults (README, "Performance", has the cost). Keeping freed memory in the
heap instead (no mmap for large blocks, no trimming) removes that cost. At most _ARENAS
arenas: one made every thread (XLA's workers, the compiling threads, Python's) take turns at
one lock and share one heap fragmented by compilation, which left the steps of a run that
compiled 8-30% slower than those of a run that loaded its programs from the cache (README,
"Performance", "End to end on a quiet host"). These are the mallopt equivalents of
  GLIBC_TUNABLES=glibc.malloc.arena_max=4:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...
and take effect for every later allocation of the process. Nothing happens on a non-glibc
system, or when GPT2JAX_NO_MALLOPT=1 is set (to measure the difference).

What the hardware wants: `compiler_options` (how XLA compiles the model's programs on a
platform) and `fast_compute_dtype` (what model.dtype="auto" means on a device).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from pathlib import Path
from typing import Any

import jax

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_ARENAS = 4  # 1: the steps 1.1-1.4x slower on the CPU recipe; glibc's default: 8 per core

_applied: bool | None = None
_libc = None  # glibc, once tune_allocator has tuned it

CACHE_ENV = "GPT2JAX_COMPILATION_CACHE"
_CACHE_MAX_BYTES = 2 * 2**30  # least recently used entries go beyond this
_CACHE_MIN_COMPILE_SECONDS = 0.2  # an eager op compiles in milliseconds; a model step takes longer


def compilation_cache_dir() -> Path | None:
  """Where compiled executables are cached, or None when the cache is off."""
  setting = os.environ.get(CACHE_ENV, "").strip()
  if setting.lower() in ("off", "0", "false", "none"):
    return None
  if setting:
    return Path(setting).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "gpt2jax" / "xla"


def enable_compilation_cache() -> Path | None:
  """Points JAX's persistent compilation cache at compilation_cache_dir(); -> the directory
  in use (also one the user gave JAX), or None."""
  if jax.config.jax_compilation_cache_dir:  # the user's own choice wins
    return Path(jax.config.jax_compilation_cache_dir)
  directory = compilation_cache_dir()
  if directory is None:
    return None
  try:
    directory.mkdir(parents=True, exist_ok=True)
    writable = os.access(directory, os.W_OK)
  except OSError:
    writable = False
  if not writable:  # else JAX would warn at every compilation
    print(f"note: compiled programs are not cached: {directory} is not a writable directory; "
          f"set {CACHE_ENV} to one (or to 'off').", file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_compilation_cache_max_size", _CACHE_MAX_BYTES)
  # JAX caches only compilations longer than 1 s by default: on a fast CPU that leaves out
  # the evaluation step and the finiteness check, which every start then compiles again.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", _CACHE_MIN_COMPILE_SECONDS)
  return directory


def compiler_options(platform: str) -> dict[str, int] | None:
  """XLA options for compiling the model's programs on `platform` (a device's .platform).

  On CPU, LLVM optimizes the generated code at -O1 instead of -O3: compiling a train step
  takes a quarter to almost half less time, and the steps run as fast and compute the same
  bits (README, "Performance", "End to end on a quiet host"), since their time goes to the
  matmul library's kernels and to loops that XLA has already vectorized. Other platforms keep
  XLA's defaults.
  """
  return {"xla_backend_optimization_level": 1} if platform == "cpu" else None


def fast_compute_dtype(device: Any = None) -> str:
  """What model.dtype="auto" computes in on `device` (default: the first one): "bfloat16"
  where matmuls run fast in it -- TPUs, GPUs from compute capability 8.0 (A100, RTX 30xx)
  on, CPUs with bfloat16 matrix instructions (x86 AVX512_BF16 or AMX) -- else "float32"
  (an older GPU or CPU would convert every bfloat16 matmul to float32, or emulate it)."""
  device = device or jax.devices()[0]
  if device.platform == "tpu":
    return "bfloat16"
  if device.platform == "gpu":
    capability = getattr(device, "compute_capability", None)  # CUDA only
    return "bfloat16" if capability and float(capability) >= 8.0 else "float32"
  if device.platform == "cpu" and _cpu_flags() & {"avx512_bf16", "amx_bf16"}:
    return "bfloat16"
  return "float32"


@functools.cache
def _cpu_flags() -> frozenset:
  """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
      for line in cpuinfo:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def tune_allocator() -> bool:
  """Applies the allocator settings once; True when glibc accepted all of them."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get("GPT2JAX_NO_MALLOPT") == "1":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False  # not glibc (macOS, musl): nothing to tune
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  mallopt.restype = ctypes.c_int
  ok = mallopt(_M_ARENA_MAX, _ARENAS) == 1
  ok &= mallopt(_M_MMAP_MAX, 0) == 1
  ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
  _applied = bool(ok)
  global _libc
  _libc = libc if _applied else None
  return _applied


def release_free_memory() -> None:
  """Gives the heap's free pages back to the system (glibc's malloc_trim), which the settings
  above otherwise keep for the process's life. For long loops other than the train step
  (scoring a large file), whose churn of Python and numpy objects would otherwise keep the
  high-water mark of everything freed so far; each call costs page faults when the memory is
  used again, so call it seconds apart, not per step."""
  if _libc is not None:
    _libc.malloc_trim(0)


def apply() -> None:
  """Everything gpt2jax sets for the process; called on `import gpt2jax`."""
  tune_allocator()
  enable_compilation_cache()
