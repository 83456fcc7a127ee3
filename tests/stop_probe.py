"""Sends SIGTERM to a training run at a known point, and tells how far the device had got.

Used by tests/test_preemption.py, in process and in tests/multihost_train_stop.py.
"""

import dataclasses
import os
import signal
import time

import jax

from gpt2jax import train_lib


class Probe:
  """Sends SIGTERM at a known point of a run: as the host dispatches train step `at_step` (of
  this session), or (evaluating=True) the first evaluation batch after that step.

  It records every train step's output, to tell which steps the device had finished just
  after the signal (Array.is_ready: device progress, read without timing anything). With
  hold_seconds the host then waits before going on (see tests/multihost_train_stop.py).
  """

  def __init__(self, monkeypatch, at_step: int, *, evaluating: bool = False,
               hold_seconds: float = 0.0):
    self.hold_seconds = hold_seconds
    self.outputs: list[jax.Array] = []  # of each dispatched train step
    self.finished_at_signal: int | None = None
    compiled_train_step, setup_run = train_lib.Run.compiled_train_step, train_lib.setup_run

    def recording_compiled_train_step(run):
      compiled = compiled_train_step(run)
      train_step = compiled.executable

      def recorded(state, batch):
        state, step_metrics = train_step(state, batch)
        self.outputs.append(step_metrics["loss"])
        if len(self.outputs) == at_step and not evaluating:
          self._signal()
        return state, step_metrics

      return dataclasses.replace(compiled, executable=recorded)

    def setup_run_with_probed_evaluation(config, workdir):
      run = setup_run(config, workdir)
      eval_step = run.eval_step

      def probed(params, batch):
        loss = eval_step(params, batch)
        if evaluating and len(self.outputs) == at_step and self.finished_at_signal is None:
          self._signal()
        return loss

      run.eval_step = probed
      return run

    monkeypatch.setattr(train_lib.Run, "compiled_train_step", recording_compiled_train_step)
    monkeypatch.setattr(train_lib, "setup_run", setup_run_with_probed_evaluation)

  def _signal(self) -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # train_lib's StopRequests, or JAX's on several hosts
    finished = [output.is_ready() for output in self.outputs]
    self.finished_at_signal = finished.index(False) if False in finished else len(finished)
    time.sleep(self.hold_seconds)
