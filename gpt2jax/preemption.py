"""Stopping a training run cleanly on SIGTERM or SIGINT (preemption, `kill`, Ctrl-C).

The first signal asks the loop to stop after the step it is running; the loop then saves a
checkpoint, waits for it to be written and exits 0. A second signal aborts at once: after
the first one the signals are left to the operating system's default action, so the second
ends the process even while it is blocked in a computation or a save. An interrupted save
never harms the checkpoints already written (see gpt2jax.checkpoint).

With several processes (a multi-host TPU slice), each host may receive SIGTERM at a slightly
different step. JAX's preemption service (started by `jax.distributed.initialize()`) catches
SIGTERM itself and agrees with all hosts on one step to stop at;
`multihost_utils.reached_preemption_sync_point(step)` reports it, so all hosts save the same
step. A Python SIGTERM handler would replace JAX's, so in that case only SIGINT is caught
here, and it is passed on to JAX's service as a SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys

import jax

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
  """While active (a context manager), turns SIGTERM/SIGINT into a request to stop.

  should_stop(step) is asked once per step, with the same step on every process.
  """

  def __init__(self, *, multihost: bool | None = None, announce: bool = True):
    self.multihost = jax.process_count() > 1 if multihost is None else multihost
    self.announce = announce
    self.signal_name: str | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> "StopRequests":
    caught = (signal.SIGINT,) if self.multihost else STOP_SIGNALS
    for signum in caught:
      self._previous[signum] = signal.signal(signum, self._on_signal)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _on_signal(self, signum: int, frame) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name
    for caught in self._previous:
      signal.signal(caught, signal.SIG_DFL)  # a second signal ends the process at once
    if self.announce:
      # os.write, not print: the handler may run in the middle of a print to stderr.
      os.write(sys.stderr.fileno(), (
          f"\n{self.signal_name} received: stopping after this step and saving a checkpoint "
          f"(send it again to abort at once).\n").encode())
    if self.multihost:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service tells the other hosts

  def should_stop(self, step: int) -> bool:
    if self.multihost:
      return _reached_preemption_sync_point(step)
    return self.signal_name is not None

  def reason(self) -> str:
    return self.signal_name or "a preemption notice"


def _reached_preemption_sync_point(step: int) -> bool:
  from jax.experimental import multihost_utils

  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # the preemption service is turned off (jax_enable_preemption_service)
    return False
