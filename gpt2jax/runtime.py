"""Process-level settings that make JAX on CPU fast, applied once when gpt2jax is imported.

The compiled training step needs a large temporary buffer (hundreds of MB) at every call.
glibc serves blocks that large with mmap and returns them with munmap, so each step pays
tens of thousands of page faults (measured: 17-20% of a CPU step). Keeping freed memory in
the heap instead (no mmap for large blocks, no trimming, one arena) removes that cost.
These are the mallopt equivalents of
  GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...
and take effect for every later allocation of the process. Nothing happens on a non-glibc
system, or when GPT2JAX_NO_MALLOPT=1 is set (to measure the difference).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied: bool | None = None


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
  ok = mallopt(_M_ARENA_MAX, 1) == 1
  ok &= mallopt(_M_MMAP_MAX, 0) == 1
  ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
  _applied = bool(ok)
  return _applied


def apply() -> None:
  """Everything gpt2jax sets for the process; called on `import gpt2jax`."""
  tune_allocator()
