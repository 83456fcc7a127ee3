"""Which platform's path a kernel takes: chosen while tracing when the caller knows the
platform (`traced_for`), else when lowering (`jax.lax.platform_dependent`).

platform_dependent traces, differentiates and lowers every platform's path, and XLA drops the
others only after its first passes: on the CPU recipe's train step that is about a third of
the tracing and a tenth of the compilation, paid again at every cold start (README,
"Performance"). The train, eval and init programs are made for one mesh, whose platform is
known (also when compiling ahead of time for a TPU on a CPU host), so they are traced for it;
anything traced without one (jax.export for several platforms, a kernel called on its own)
keeps platform_dependent.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Callable

import jax

_TRACING_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gpt2jax_kernels_tracing_for", default=None)


def traced_for(platform: str | None, fn: Callable) -> Callable:
  """fn, whose kernels take `platform`'s path ("cpu", "gpu", "tpu": a device's .platform)
  while it runs, which for a jitted fn is while it is traced; fn itself for None."""
  if platform is None:
    return fn

  @functools.wraps(fn)
  def for_platform(*args, **kwargs):
    token = _TRACING_FOR.set(platform)
    try:
      return fn(*args, **kwargs)
    finally:
      _TRACING_FOR.reset(token)

  return for_platform


def by_platform(*args, cpu: Callable, default: Callable):
  """cpu(*args) on CPU, default(*args) elsewhere: the platform `traced_for` set, or, without
  one, jax.lax.platform_dependent's choice when lowering."""
  platform = _TRACING_FOR.get()
  if platform is None:
    return jax.lax.platform_dependent(*args, cpu=cpu, default=default)
  return (cpu if platform == "cpu" else default)(*args)
