"""`train.py --compile_only --topology=...`: the sharded step compiled for a TPU slice here.

Needs libtpu (requirements-tpu.txt, which .ci/run installs); skipped without it.
"""

import importlib.util
import re
import textwrap

import pytest

from conftest import REPO, run_script, tiny_config

pytestmark = [
    pytest.mark.slow,  # compiles for a TPU slice, in part through train.py
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                       reason="libtpu is not installed (pip install -r requirements-tpu.txt)"),
]

UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _bytes(text: str, label: str) -> float:
  value, unit = re.search(rf"{label} ([\d.]+) (\w+)", text).groups()
  return float(value) * UNITS[unit]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("tpu") / "tiny_tpu.py"
  path.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(REPO / "tests")!r})
      from conftest import tiny_config

      def get_config():
        config = tiny_config(model__n_embd=64, model__n_head=4, train__batch_size=16)
        config.tokenizer.vocab_size = 512  # no corpus needed to compile
        return config
      """), encoding="utf-8")
  return path


def _compile(config_file, workdir, *flags):
  done = run_script("train.py", f"--config={config_file}", f"--workdir={workdir}",
                    "--compile_only", "--topology=v5e:2x2", *flags)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_fsdp_step_compiles_for_a_tpu_slice_and_needs_less_memory_per_chip(config_file,
                                                                           tmp_path):
  fsdp = _compile(config_file, tmp_path, "--config.mesh.data=1", "--config.mesh.fsdp=-1")
  data_parallel = _compile(config_file, tmp_path, "--config.mesh.data=-1")
  assert "mesh data=1 x fsdp=4 over 4 TPU v5 lite device(s)" in fsdp
  assert "mesh data=4 x fsdp=1 over 4 TPU v5 lite device(s)" in data_parallel
  for report in (fsdp, data_parallel):
    assert re.search(r"per device and step: [\d.]+ [MGT]FLOP, [\d.]+ \w+ accessed", report)
    assert re.search(r"roofline on v5e .* step >= [\d.]+ ms .* MFU <= [\d.]+%", report)
    assert "fits: " in report
  assert not (tmp_path / "checkpoints").exists()  # nothing trained, nothing written
  # Parameters and Adam moments split four ways: under a third of the data-parallel bytes.
  assert _bytes(fsdp, "arguments") < _bytes(data_parallel, "arguments") / 3


def test_a_step_too_large_for_the_chip_is_reported_with_what_to_change(tmp_path):
  from gpt2jax import aot

  config = tiny_config(model__block_size=1024, train__batch_size=4096)
  config.tokenizer.vocab_size = 4096  # logits alone: 4096 x 1024 x 4096 floats, 64 GiB
  lines = aot.compile_only(config, tmp_path, "v5e:2x2")
  assert any(line.startswith("does not fit in the 16.00 GiB HBM of a v5e device") for line in lines)
  assert any("--config.mesh.fsdp=-1" in line for line in lines)
