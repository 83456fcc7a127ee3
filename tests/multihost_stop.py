"""One of two processes of a simulated multi-host job, stepping until a stop request.

  python tests/multihost_stop.py PROCESS_ID PORT

Both processes join with jax.distributed.initialize (as on a TPU pod slice) and step through
a loop asking gpt2jax.preemption.StopRequests whether to stop. tests/test_preemption.py
signals only one of them; both must stop at the same step, as they must to save one
checkpoint together.
"""

import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(process_id: int, port: int) -> None:
  jax.config.update("jax_num_cpu_devices", 1)
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id, initialization_timeout=60)
  from gpt2jax import preemption

  with preemption.StopRequests() as stop_requests:
    assert stop_requests.multihost
    for step in range(1, 6000):
      time.sleep(0.01)  # a training step
      if step == 10:
        print("running", flush=True)
      if stop_requests.should_stop(step):
        print(f"stopping at step {step}", flush=True)
        return
  print("never asked to stop", flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]))
