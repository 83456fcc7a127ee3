"""Never lose a run: SIGTERM/SIGINT, kill -9 during a save, and exact resumption."""

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import kill_during_save
from conftest import REPO, tiny_config
from gpt2jax import checkpoint as ckpt
from gpt2jax import errors, preemption, train_lib
from gpt2jax.metrics import read_metrics

TIMING_KEYS = {"tokens_per_second", "elapsed_seconds", "model_tflops_per_second", "mfu"}
# Intervals that do not line up (log 7, eval 25), dropout on and a schedule that does not
# depend on num_steps, so a resumed run can be compared with an uninterrupted one.
RUN = dict(train__decay_steps=1000, train__log_every=7, train__eval_every=25,
           train__checkpoint_every=1000, train__sample_tokens=0, model__dropout=0.1)


def comparable(records: list[dict]) -> list[dict]:
  """metrics.jsonl without the wall-clock fields."""
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def assert_same_params(a, b) -> None:
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def subprocess_env(**extra) -> dict:
  return dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONDONTWRITEBYTECODE="1", **extra)


def test_a_run_stopped_between_log_lines_logs_exactly_what_an_uninterrupted_one_does(
    tmp_path, tiny_text_file, monkeypatch, capsys):
  # (Runs first: the programs it compiles are those the subprocess below finds in the cache.)
  config = tiny_config(tiny_text_file, train__num_steps=40, **RUN)
  with monkeypatch.context() as patch:  # a stop request arrives during step 13
    patch.setattr(preemption.StopRequests, "should_stop", lambda self, step: step == 13)
    stopped = train_lib.train_and_evaluate(config, tmp_path / "run")
  assert int(stopped.step) == 13
  assert "Stopped by a preemption notice after step 13 of 40" in capsys.readouterr().out
  assert ckpt.Checkpoints(tmp_path / "run", for_training=False).steps() == [13]

  resumed = train_lib.train_and_evaluate(config, tmp_path / "run")
  straight = train_lib.train_and_evaluate(config, tmp_path / "straight")
  records = comparable(read_metrics(tmp_path / "run"))
  assert [r["step"] for r in records] == [0, 7, 14, 21, 25, 28, 35, 40]
  assert records == comparable(read_metrics(tmp_path / "straight"))  # 14 averages 8..14
  assert_same_params(resumed.params, straight.params)
  assert_same_params(resumed.opt_state, straight.opt_state)


def test_sigterm_saves_the_step_reached_exits_0_and_resumes_exactly(tmp_path, tiny_text_file):
  config_file = tmp_path / "recipe.py"
  config_file.write_text(textwrap.dedent(f"""\
      import sys
      sys.path.insert(0, {str(REPO / "tests")!r})
      from conftest import tiny_config
      def get_config():
        return tiny_config({str(tiny_text_file)!r}, train__num_steps=100_000, **{RUN!r})
      """), encoding="utf-8")
  workdir, cwd, tmp = tmp_path / "run", tmp_path / "cwd", tmp_path / "tmp"
  cwd.mkdir()
  tmp.mkdir()
  process = subprocess.Popen(
      [sys.executable, str(REPO / "train.py"), f"--config={config_file}", f"--workdir={workdir}"],
      cwd=cwd, env=subprocess_env(TMPDIR=str(tmp)), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, encoding="utf-8")
  for line in process.stdout:
    if line.startswith("step 14:"):  # training is under way
      break
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=300)

  assert process.returncode == 0, err
  stopped = re.search(r"Stopped by SIGTERM after step (\d+) of 100000; checkpoint saved in "
                      r"(\S+)\.\nTo resume, run the same command again: python \S*train.py", out)
  assert stopped, out[-2000:]
  step = int(stopped.group(1))
  assert stopped.group(2) == str(workdir / "checkpoints" / str(step))
  assert f"--workdir={workdir}" in out and "Traceback" not in err
  assert ckpt.Checkpoints(workdir, for_training=False).latest_step() == step
  assert max(r["step"] for r in read_metrics(workdir)) <= step
  # Writes stay inside the workdir: nothing in the working or temporary directory.
  assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == []

  config = tiny_config(tiny_text_file, train__num_steps=step + 15, **RUN)
  resumed = train_lib.train_and_evaluate(config, workdir)
  straight = train_lib.train_and_evaluate(config, tmp_path / "straight")
  assert comparable(read_metrics(workdir)) == comparable(read_metrics(tmp_path / "straight"))
  assert_same_params(resumed.params, straight.params)


STOP_LOOP = """
import sys, time
sys.path.insert(0, {repo!r})
from gpt2jax import preemption
with preemption.StopRequests(multihost=False) as requests:
  print("ready", flush=True)
  while not requests.should_stop(0):
    time.sleep(0.01)
  print("stop requested", flush=True)
  time.sleep(120)  # a slow save
print("the second signal did not abort")
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_aborts_at_once(signum):
  process = subprocess.Popen([sys.executable, "-c", STOP_LOOP.format(repo=str(REPO))],
                             env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  assert process.stdout.readline() == "ready\n"
  process.send_signal(signum)
  assert process.stdout.readline() == "stop requested\n"
  process.send_signal(signum)
  process.wait(timeout=30)
  assert process.returncode == -signum
  name = signal.Signals(signum).name
  assert f"{name} received: stopping after this step" in process.stderr.read()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_all_hosts_stop_at_the_same_step_when_one_is_signalled(signum):
  port = _free_port()
  processes = [subprocess.Popen(
      [sys.executable, str(REPO / "tests" / "multihost_stop.py"), str(i), str(port)],
      env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  for process in processes:
    assert process.stdout.readline() == "running\n", process.stderr.read()
  processes[1].send_signal(signum)  # only one host is told
  outputs = [process.communicate(timeout=120)[0] for process in processes]
  assert [p.returncode for p in processes] == [0, 0]
  steps = [re.search(r"stopping at step (\d+)", out) for out in outputs]
  assert all(steps), outputs
  assert steps[0].group(1) == steps[1].group(1)


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory, tiny_text_file, uninterrupted):
  """One workdir per stage, each from a run killed with SIGKILL at that stage of a save.

  (After `uninterrupted`, which compiles the programs these runs then load from the cache.)
  """
  root = tmp_path_factory.mktemp("killed")
  processes = {stage: subprocess.Popen(
      [sys.executable, str(REPO / "tests" / "kill_during_save.py"), str(root / stage),
       str(tiny_text_file), stage], env=subprocess_env(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for stage in kill_during_save.STAGES}
  results = {}
  for stage, process in processes.items():  # they run side by side
    out, err = process.communicate(timeout=600)
    results[stage] = (root / stage, process.returncode, out + err)
  return results


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_text_file):
  config = kill_during_save.config(str(tiny_text_file))
  config.train.num_steps = 30
  workdir = tmp_path_factory.mktemp("uninterrupted")
  state = train_lib.train_and_evaluate(config, workdir)
  return jax.device_get(state.params), comparable(read_metrics(workdir))


@pytest.mark.parametrize("stage, complete_step", [
    ("writing", 10), ("renaming", 10), ("renamed", 20), ("deleting", 20)])
def test_kill_9_during_a_save_resumes_from_the_last_complete_checkpoint(
    stage, complete_step, killed_runs, uninterrupted, tiny_text_file, capsys):
  workdir, returncode, output = killed_runs[stage]
  assert returncode == -signal.SIGKILL and f"killed at {stage}" in output, output
  checkpoint_dir = workdir / "checkpoints"
  unfinished = checkpoint_dir / "20.orbax-checkpoint-tmp"
  assert unfinished.is_dir() == (complete_step == 10)  # what a half-written save leaves
  assert ckpt.Checkpoints(workdir, for_training=False).latest_step() == complete_step
  if stage == "deleting":  # the previous checkpoint is half deleted: listed but unreadable
    with pytest.raises(errors.UserError, match=r"checkpoints/10 cannot be read .* move it"):
      train_lib.sampling.load_model(workdir, step=10)

  config = kill_during_save.config(str(tiny_text_file))
  config.train.num_steps = 30
  capsys.readouterr()
  resumed = train_lib.train_and_evaluate(config, workdir)
  assert f"resuming from step {complete_step}" in capsys.readouterr().out
  assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["30"]  # leftovers cleaned up
  params, records = uninterrupted
  assert_same_params(resumed.params, params)
  assert comparable(read_metrics(workdir)) == records
