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
from stop_probe import Probe
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


@pytest.mark.parametrize("stop_at", [
    13,  # between log lines: the checkpoint carries the steps since the last one
    25,  # at an evaluation: the resumed run evaluates and samples it
    40,  # at the last step, which evaluates too: the resumed run does, and finishes the run
])
def test_a_stopped_run_logs_exactly_what_an_uninterrupted_one_does(
    stop_at, tmp_path, tiny_text_file, monkeypatch, capsys):
  # (Runs first: the programs it compiles are those the subprocess below finds in the cache.)
  config = tiny_config(tiny_text_file, train__num_steps=40, **{**RUN, "train__sample_tokens": 8})
  with monkeypatch.context() as patch:  # a stop request arrives during step stop_at
    patch.setattr(preemption.StopRequests, "should_stop", lambda self, step: step == stop_at)
    stopped = train_lib.train_and_evaluate(config, tmp_path / "run")
  assert int(stopped.step) == stop_at
  assert f"Stopped by a preemption notice after step {stop_at} of 40" in capsys.readouterr().out
  assert ckpt.Checkpoints(tmp_path / "run", for_training=False).steps() == [stop_at]
  assert max(r["step"] for r in read_metrics(tmp_path / "run") if "val_loss" in r) < stop_at

  resumed = train_lib.train_and_evaluate(config, tmp_path / "run")
  straight = train_lib.train_and_evaluate(config, tmp_path / "straight")
  records = comparable(read_metrics(tmp_path / "run"))
  assert [r["step"] for r in records] == [0, 7, 14, 21, 25, 28, 35, 40]
  assert records == comparable(read_metrics(tmp_path / "straight"))  # 14 averages 8..14
  for name in ("samples.txt", "summary.json"):
    assert (tmp_path / "run" / name).exists(), name
  assert (tmp_path / "run" / "samples.txt").read_text(encoding="utf-8") == (
      tmp_path / "straight" / "samples.txt").read_text(encoding="utf-8")
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
                      r"(\S+) \(\d+\.\d s from the signal to the checkpoint on disk\)\.\n"
                      r"To resume, run the same command again: python \S*train.py", out)
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


# A model big enough that the device runs slower than the host dispatches (as any real one).
SLOW = dict(model__n_layer=2, model__n_head=4, model__n_embd=128, model__block_size=64,
            train__batch_size=16)
BOUND = train_lib.MAX_UNFINISHED_STEPS + 1  # steps past the last one finished at the signal


@pytest.mark.parametrize("eval_every, evaluating", [
    (20, False),  # far: the host is stopped before it can queue the steps up to it
    (10, False),  # due at the step where the request is honoured
    (10, True),  # under way when the request comes
])
def test_sigterm_stops_within_the_bound_without_evaluating_and_resumes_exactly(
    eval_every, evaluating, tmp_path, tiny_text_file, monkeypatch, capsys):
  # log_every beyond the run: unbounded, the loop would read metrics only at evaluations.
  config = tiny_config(tiny_text_file, train__num_steps=24, **{
      **RUN, **SLOW, "train__log_every": 1000, "train__eval_every": eval_every,
      "train__sample_tokens": 8})
  with monkeypatch.context() as patch:
    probe = Probe(patch, at_step=10, evaluating=evaluating)
    stopped = train_lib.train_and_evaluate(config, tmp_path / "run")
  step, finished = int(stopped.step), probe.finished_at_signal
  assert finished is not None and finished <= step <= finished + BOUND, (finished, step)
  assert f"Stopped by SIGTERM after step {step} of 24; checkpoint saved in" in (
      capsys.readouterr().out)
  assert ckpt.Checkpoints(tmp_path / "run", for_training=False).steps() == [step]
  # Nothing was evaluated or sampled after the signal: the step-0 evaluation is all there is.
  assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0]
  assert not (tmp_path / "run" / "samples.txt").exists()

  resumed = train_lib.train_and_evaluate(config, tmp_path / "run")
  straight = train_lib.train_and_evaluate(config, tmp_path / "straight")
  records = comparable(read_metrics(tmp_path / "run"))
  assert [r["step"] for r in records] == sorted({0, *range(eval_every, 25, eval_every), 24})
  assert records == comparable(read_metrics(tmp_path / "straight"))
  assert (tmp_path / "run" / "samples.txt").read_text(encoding="utf-8") == (
      tmp_path / "straight" / "samples.txt").read_text(encoding="utf-8")
  assert_same_params(resumed.params, straight.params)
  assert_same_params(resumed.opt_state, straight.opt_state)


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
  assert f"{name} received: stopping within a few steps" in process.stderr.read()


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


def test_hosts_agree_to_stop_within_the_bound_when_one_is_signalled(tmp_path, tiny_text_file):
  import multihost_train_stop as script

  port, workdir = _free_port(), tmp_path / "run"
  processes = [subprocess.Popen(
      [sys.executable, script.__file__, str(i), str(port), str(tiny_text_file), str(workdir)],
      env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [process.communicate(timeout=600) for process in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  steps = {int(re.search(r"process \d stopped at step (\d+)", out).group(1)) for out, _ in outputs}
  assert len(steps) == 1, outputs  # one checkpoint, written by both
  step = steps.pop()
  # JAX's rule: one step after the furthest host's latest check. Each host checks a step once
  # the step MAX_UNFINISHED_STEPS before it has finished, and none can get past the steps that
  # process 0 had dispatched (SIGNAL_AT) while it held its host: so at most BOUND after those.
  assert script.SIGNAL_AT <= step <= script.SIGNAL_AT + BOUND, outputs[0][0]
  assert f"Stopped by a preemption notice after step {step} of 24" in outputs[0][0]
  assert ckpt.Checkpoints(workdir, for_training=False).steps() == [step]
  assert [r["step"] for r in read_metrics(workdir)] == [0]  # no evaluation after the signal
  assert not (workdir / "samples.txt").exists()


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
