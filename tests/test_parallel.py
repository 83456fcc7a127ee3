"""Meshes, sharded training, multi-process runs, gradient accumulation and bf16.

Multi-device cases run in subprocesses with 8 simulated CPU devices (the flag must be set
before JAX starts); each compares its losses with the same run on this process's one device.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, tiny_config
from gpt2jax import optim, parallel, steps, train_lib
from gpt2jax.errors import UserError
from gpt2jax.metrics import read_metrics
from gpt2jax.model import GPT, GPTConfig
from gpt2jax.tokenizer import CharTokenizer

TESTS = Path(__file__).resolve().parent
SHORT_RUN = dict(train__num_steps=6, train__decay_steps=6, train__warmup_steps=2,
                 train__log_every=1, train__eval_every=6, train__checkpoint_every=3,
                 train__sample_tokens=0, model__dropout=0.1)


def _env(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", PYTHONIOENCODING="utf-8")


def _losses(workdir: Path) -> dict[int, float]:
  return {r["step"]: r["train_loss"] for r in read_metrics(workdir) if "train_loss" in r}


def _assert_same_losses(actual: dict, expected: dict, rtol: float = 1e-5) -> None:
  assert sorted(actual) == sorted(expected)
  for step in expected:
    assert actual[step] == pytest.approx(expected[step], rel=rtol), step


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory, tiny_text_file) -> Path:
  """The reference: the short run on this process's single device."""
  workdir = tmp_path_factory.mktemp("one_device")
  train_lib.train_and_evaluate(tiny_config(tiny_text_file, **SHORT_RUN), workdir)
  return workdir


EIGHT_DEVICE_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import jax
from conftest import tiny_config
from gpt2jax import parallel, train_lib

def config(data, fsdp, **overrides):
  c = tiny_config({text!r}, **{{**{short_run!r}, **overrides}})
  c.mesh.data, c.mesh.fsdp = data, fsdp
  return c

out = {{"devices": jax.device_count()}}
train_lib.train_and_evaluate(config(-1, 1), {workdir!r} + "/dp")
# FSDP over 8 devices to step 3, then resumed with data parallelism (another mesh) to step 6.
fsdp = train_lib.train_and_evaluate(config(1, 8, train__num_steps=3), {workdir!r} + "/fsdp")
wte = fsdp.params["wte"]["embedding"]
out["fsdp_spec"] = list(wte.sharding.spec)
out["fsdp_shard_shape"] = list(wte.addressable_shards[0].data.shape)
out["fsdp_param_bytes_per_device"] = parallel.bytes_per_device(fsdp.params)
leaves = jax.tree_util.tree_leaves(fsdp.params)
out["matrix_bytes"] = sum(x.nbytes for x in leaves if x.ndim >= 2)
out["vector_bytes"] = sum(x.nbytes for x in leaves if x.ndim < 2)
train_lib.train_and_evaluate(config(2, 4, train__sample_tokens=8), {workdir!r} + "/fsdp")
print(json.dumps(out))
"""


@pytest.mark.slow
def test_data_parallel_and_fsdp_on_8_devices_match_one_device(tmp_path, tiny_text_file,
                                                                one_device_run):
  script = EIGHT_DEVICE_SCRIPT.format(tests=str(TESTS), text=str(tiny_text_file),
                                      short_run=SHORT_RUN, workdir=str(tmp_path))
  done = subprocess.run([sys.executable, "-c", script], env=_env(8), cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  assert "mesh data=2 x fsdp=4 over 8 cpu device(s)" in done.stdout  # the startup report

  expected = _losses(one_device_run)
  assert sorted(expected) == list(range(7))  # the step-0 evaluation, then steps 1-6
  _assert_same_losses(_losses(tmp_path / "dp"), expected)
  _assert_same_losses(_losses(tmp_path / "fsdp"), expected)  # steps 4-6 after a mesh change
  val = [r["val_loss"] for r in read_metrics(one_device_run) if "val_loss" in r]
  assert [r["val_loss"] for r in read_metrics(tmp_path / "fsdp") if r["step"] == 6
          and "val_loss" in r] == pytest.approx(val[-1:], rel=1e-5)

  # FSDP really splits the parameters: every matrix along n_embd, 1/8 per device; only the
  # small vectors (biases, LayerNorm) are replicated.
  assert out["fsdp_spec"] == [None, "fsdp"]
  assert out["fsdp_shard_shape"][1] == 32 // 8
  assert out["fsdp_param_bytes_per_device"] == out["matrix_bytes"] / 8 + out["vector_bytes"]

  # A checkpoint written by the 8-device mesh loads for sampling on one device.
  from gpt2jax import runs

  loaded = runs.load_model(tmp_path / "fsdp")
  assert loaded.step == 6
  assert {d for x in jax.tree_util.tree_leaves(loaded.params) for d in x.devices()} == {
      jax.devices()[0]}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together_like_one(tmp_path, tiny_text_file, one_device_run):
  config_file = tmp_path / "tiny_config.py"
  config_file.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(TESTS)!r})
      from conftest import tiny_config

      def get_config():
        return tiny_config({str(tiny_text_file)!r}, **{{**{SHORT_RUN!r}, "train__sample_tokens": 8}})
      """), encoding="utf-8")
  port = _free_port()
  workdir = tmp_path / "run"
  processes = [
      subprocess.Popen(
          [sys.executable, str(REPO / "train.py"), f"--config={config_file}",
           f"--workdir={workdir}", "--config.mesh.data=2", "--config.mesh.fsdp=2",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
           f"--process_id={i}"],
          env=_env(2), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = []
  for p in processes:
    try:
      outputs.append(p.communicate(timeout=600))
    finally:
      p.kill()
  for p, (stdout, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]
  assert "mesh data=2 x fsdp=2 over 4 cpu device(s) in 2 process(es)" in outputs[0][0]
  assert "step" not in outputs[1][0] and "mesh" not in outputs[1][0]  # only process 0 reports
  _assert_same_losses(_losses(workdir), _losses(one_device_run))
  assert "=== step 6 ===" in (workdir / "samples.txt").read_text(encoding="utf-8")


def test_mesh_sizes_take_the_remaining_devices_and_reject_bad_shapes():
  assert parallel.mesh_shape({"data": -1, "fsdp": 2}, 8) == {"data": 4, "fsdp": 2}
  assert parallel.mesh_shape({"data": 2, "fsdp": -1}, 8) == {"data": 2, "fsdp": 4}
  for bad in ({"data": -1, "fsdp": -1}, {"data": 3, "fsdp": 1}, {"data": -1, "fsdp": 3},
              {"data": 0, "fsdp": 1}):
    with pytest.raises(UserError, match="mesh"):
      parallel.mesh_shape(bad, 8)


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_every_matrix_has_a_partition_rule(scan_layers, tie_embeddings):
  model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32,
                        scan_layers=scan_layers, tie_embeddings=tie_embeddings))
  config = tiny_config()
  state = steps.abstract_train_state(model, optim.make_optimizer(config.train))
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    axes = parallel.logical_axes(parallel.path_name(path), leaf.ndim)
    if leaf.ndim - int(scan_layers and "/h/" in f"/{parallel.path_name(path)}") >= 2:
      assert "embed" in axes, parallel.path_name(path)  # so FSDP splits it
    else:
      assert "embed" not in axes, parallel.path_name(path)  # vectors stay replicated


def test_batch_that_does_not_split_over_the_mesh_is_refused():
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1})
  parallel.check_batch_size(8, mesh, 4)
  with pytest.raises(UserError, match="grad_accum_steps=3"):
    parallel.check_batch_size(8, mesh, 3)
