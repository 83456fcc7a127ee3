"""Stopping a training run cleanly on SIGTERM or SIGINT (preemption, `kill`, Ctrl-C).

The first signal asks the loop to stop. It does so within a few steps (gpt2jax.train_lib
bounds how far the host runs ahead of the device: MAX_UNFINISHED_STEPS), skipping the
evaluation and sample that fall due, then saves a checkpoint, waits until it is written and
exits 0. A second signal aborts at once: after the first one the signals are left to the
operating system's default action, so the second ends the process even while it is blocked
in a computation or a save. An interrupted save never harms the checkpoints already written
(see gpt2jax.checkpoint).

With several processes (a multi-host TPU slice), each host may receive SIGTERM at a slightly
different step. JAX's preemption service (started by `jax.distributed.initialize()`) catches
SIGTERM itself and agrees with all hosts on one step to stop at;
`multihost_utils.reached_preemption_sync_point(step)` reports it, so all hosts save the same
step. A Python SIGTERM handler would replace JAX's, so in that case only SIGINT is caught
here, and it is passed on to JAX's service as a SIGTERM. JAX's rule is one step after the
furthest host's latest check; every host checks at each step it dispatches, within the same
bound of its device, so the agreed step is at most one step later than on a single host.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import jax

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
  """While active (a context manager), turns SIGTERM/SIGINT into a request to stop.

  should_stop(step) is asked once per step, with the same step on every process.
  requested() may be asked at any time, for work that a stop can cut short on this host alone.
  """

  def __init__(self, *, multihost: bool | None = None, announce: bool = True):
    self.multihost = jax.process_count() > 1 if multihost is None else multihost
    self.announce = announce
    self.signal_name: str | None = None
    self._requested_at: float | None = None  # time.monotonic() of the signal, or agreement
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
    self._requested_at = time.monotonic()
    self.signal_name = signal.Signals(signum).name
    for caught in self._previous:
      signal.signal(caught, signal.SIG_DFL)  # a second signal ends the process at once
    if self.announce:
      _announce(f"\n{self.signal_name} received: stopping within a few steps and saving a "
                "checkpoint (send it again to abort at once).\n")
    if self.multihost:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service tells the other hosts

  def should_stop(self, step: int) -> bool:
    if self.multihost:
      stop = _reached_preemption_sync_point(step)
      if stop and self._requested_at is None:  # JAX caught the SIGTERM: time from the agreement
        self._requested_at = time.monotonic()
      return stop
    return self.signal_name is not None

  def requested(self) -> bool:
    """Whether a stop was requested, on a single host (an evaluation can then be cut short).

    Always False on several hosts: they learn of a stop only at a step they agree on
    (should_stop), so that all of them run the same collectives until then.
    """
    return not self.multihost and self.signal_name is not None

  def seconds_since_request(self) -> float:
    """Since the signal (or, when JAX's service caught it, since the hosts agreed to stop)."""
    return time.monotonic() - self._requested_at if self._requested_at is not None else 0.0

  def reason(self) -> str:
    return self.signal_name or "a preemption notice"

  def request(self) -> str:
    """What seconds_since_request counts from."""
    return "signal" if self.signal_name else "hosts' agreement to stop"


def _announce(text: str) -> None:
  """os.write, not print: a signal handler may run in the middle of a print to stderr. A
  stderr without a file descriptor (pytest's capture, a notebook) falls back to the process's."""
  for stream in (sys.stderr, sys.__stderr__):
    try:
      os.write(stream.fileno(), text.encode())
      return
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
      continue


def _reached_preemption_sync_point(step: int) -> bool:
  from jax.experimental import multihost_utils

  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # the preemption service is turned off (jax_enable_preemption_service)
    return False
