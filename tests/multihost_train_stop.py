"""One of two processes of a simulated multi-host training run that one host's SIGTERM stops.

  python tests/multihost_train_stop.py PROCESS_ID PORT CORPUS WORKDIR

Both processes train the same model with gpt2jax.train_lib (one CPU device each, data
parallel). Process 0 sends itself SIGTERM as its host dispatches step SIGNAL_AT, then holds
its host for HOLD_SECONDS: JAX's preemption service agrees on the stop step meanwhile (it
takes milliseconds here), while no host can run further ahead (process 1's device cannot pass
the collectives of steps process 0 has not dispatched). Each process prints the step it
stopped at; tests/test_preemption.py checks them.
"""

import sys
from pathlib import Path

import jax
import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from conftest import tiny_config  # noqa: E402

SIGNAL_AT = 10
HOLD_SECONDS = 2.0
# A model big enough that the device runs slower than the host dispatches (as any real one);
# log_every beyond the run: unbounded, the hosts would read metrics only at evaluations.
RUN = dict(model__n_layer=2, model__n_head=4, model__n_embd=128, model__block_size=64,
           train__batch_size=16, train__num_steps=24, train__decay_steps=1000,
           train__log_every=1000, train__eval_every=20, train__checkpoint_every=1000,
           train__sample_tokens=8, mesh__data=2)


def main(process_id: int, port: int, corpus: str, workdir: str) -> None:
  jax.config.update("jax_num_cpu_devices", 1)
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id, initialization_timeout=60)
  from gpt2jax import train_lib
  from stop_probe import Probe

  with pytest.MonkeyPatch.context() as patch:
    probe = Probe(patch, SIGNAL_AT, hold_seconds=HOLD_SECONDS) if process_id == 0 else None
    state = train_lib.train_and_evaluate(tiny_config(corpus, **RUN), workdir)
  if probe:
    print(f"signalled with {probe.finished_at_signal} steps finished", flush=True)
  print(f"process {process_id} stopped at step {int(state.step)}", flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
