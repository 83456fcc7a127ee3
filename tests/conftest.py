"""Shared fixtures: tiny configs and a tiny trained workdir, all on data the tests write.

Which file tests which module ("slow": the tests in it marked slow; see below):

  test_model.py        model.py: GPT-2's shapes and numerics, the KV cache, count_params
  test_kernels.py      kernels/: Dense, HeadsDense, Dropout, every attention path, cache_update
  test_optim.py        optim.py: learning-rate schedule, weight-decay mask, Muon. slow: Muon
                       under FSDP on 8 simulated devices
  test_steps.py        steps.py: gradient accumulation, bfloat16 compute
  test_parallel.py     parallel.py: meshes, partition rules. slow: 8 simulated devices, two
                       processes joined by jax.distributed
  test_train.py        train_lib.py: a tiny run that learns, resume. slow: train.py
  test_preemption.py   preemption.py: stop and resume exactly. slow: signals to training
                       processes, two hosts, kill -9 during a save
  test_bad_input.py    errors.py, cli.py, nonfinite.py: one clear error, the workdir untouched
                       (also skip_nonfinite). slow: command-line mistakes
  test_workdir.py      workdir.py: config.json, the resume shape check, the lock, write_atomic
  test_checkpoint.py   checkpoint.py: Orbax saves and restores, missing steps, read-only use
  test_flops.py        flops.py: FLOPs per token, chip peaks, MFU
  test_tokenizer.py    tokenizer.py, data/normalize.py
  test_data.py         data/tokens.py, batches.py, pipeline.py; text and packaged corpora
  test_long_documents.py  data/pieces.py: long documents cut where ids stay those of the whole
  test_corpora.py      data/sources.py at scale (streamed, cloud paths), data/tfds_source.py
  test_hf_corpus.py    data/hf_source.py. slow: `datasets` is not imported for text corpora
  test_sampling.py     sampling.py, runs.py. slow: sample.py
  test_evaluate.py     scoring.py. slow: python -m gpt2jax.evaluate
  test_report.py       metrics.py: TensorBoard, summary.json
  test_plots.py        plots.py: loss curves, attention heatmaps. slow: the commands
  test_hf.py           hf_checkpoint.py, hf_tokenizer.py, pretrained.py, export.py. slow: the
                       commands, an import sharded over 8 simulated devices
  test_speed.py        runtime.py; benchmarks/. slow: the compilation cache in new processes,
                       python -m benchmarks.run
  test_nanogpt_race.py benchmarks/nanogpt_race.py, command_profile.py, step_race.py,
                       compile_race.py: commands, parsing, phases. slow: the four commands
                       on a tiny run
                       (nanoGPT's side only where GPT2JAX_TEST_NANOGPT_DIR and
                       GPT2JAX_TEST_TORCH_PYTHON are set)
  test_tpu_compile.py  aot.py, all slow (skipped without libtpu)
  test_notebook.py     notebooks/gpt2_from_scratch.ipynb. slow: running it

checkpoint.py is also tested end to end through test_train.py and test_preemption.py.
kill_during_save.py, multihost_stop.py, multihost_train_stop.py and stop_probe.py are scripts
that the preemption tests run; fixtures/ holds what transformers itself computed.

`@pytest.mark.slow` marks the tests that start other Python processes (the scripts, `python
-m ...`, several hosts), simulate several devices or compile for a TPU: `python -m pytest -q
-m "not slow" tests` is the quick inner loop; `python -m pytest -q tests` runs everything.
"""

from __future__ import annotations

import atexit
import inspect
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _share_compiled_programs() -> None:
  """A persistent compilation cache for this session, also used by the scripts tests run.

  Many tests train the same tiny model from scratch; with the cache each distinct program
  compiles once per session instead of once per run (a tiny run: ~20 s -> ~2 s here).
  """
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")  # set: a script run by a test
  if not cache:
    cache = tempfile.mkdtemp(prefix="gpt2jax-test-jit-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  import jax

  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_share_compiled_programs()

# How a test starts another process (conftest's helpers or subprocess itself).
_STARTS_A_PROCESS = re.compile(r"\b(run_script|run_module|subprocess\.run|Popen)\(")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: starts other processes, simulates several devices or compiles for a "
      "TPU (deselect with -m 'not slow')")


def pytest_collection_modifyitems(items):
  """Refuses a test that starts a process in its own body without the slow mark, so that
  -m "not slow" stays quick. (Processes started by fixtures are not seen: mark those.)"""
  unmarked = [item.nodeid for item in items
              if isinstance(item, pytest.Function) and not item.get_closest_marker("slow")
              and _STARTS_A_PROCESS.search(inspect.getsource(item.function))]
  if unmarked:
    raise pytest.UsageError("these tests start processes: mark them @pytest.mark.slow: "
                            + ", ".join(unmarked))

from configs import default  # noqa: E402

# A small bilingual text with the structure the models should pick up.
TINY_TEXT = "\n\n".join(
    f"ROMEO {i}: שלום עולם, hello world number {i % 7}.\nJULIET: ויאמר אלהים יהי אור {i % 5}!"
    for i in range(60)
)


def tiny_config(text_path: str | os.PathLike = "", **overrides):
  """A model and run small enough to train in seconds on one CPU core."""
  config = default.get_config()
  config.model.n_layer = 2
  config.model.n_head = 2
  config.model.n_embd = 32
  config.model.block_size = 32
  config.model.dropout = 0.0
  config.tokenizer.kind = "char"
  config.data.corpus = "text"
  config.data.path = str(text_path)
  config.train.batch_size = 8
  config.train.num_steps = 40
  config.train.warmup_steps = 5
  config.train.learning_rate = 3e-3
  config.train.eval_every = 20
  config.train.eval_batches = 2
  config.train.checkpoint_every = 20
  config.train.log_every = 10
  config.train.sample_tokens = 16
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
  path.write_text(TINY_TEXT, encoding="utf-8")
  return path


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, tiny_text_file) -> Path:
  """A workdir trained for 40 steps with a char tokenizer (shared by read-only tests)."""
  from gpt2jax import train_lib

  workdir = tmp_path_factory.mktemp("home") / "runs" / "tiny"
  train_lib.train_and_evaluate(tiny_config(tiny_text_file), workdir)
  return workdir


def run_script(script: str, *args: str, cwd: Path = REPO, timeout: float = 300):
  """Runs train.py / sample.py as a user would; returns the CompletedProcess."""
  import subprocess

  env = dict(os.environ, PYTHONIOENCODING="utf-8")
  return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, encoding="utf-8", timeout=timeout)


def run_module(module: str, *args: str, cwd: Path = REPO, timeout: float = 300):
  """Runs `python -m module args` (e.g. gpt2jax.evaluate) as a user would."""
  import subprocess

  env = dict(os.environ, PYTHONIOENCODING="utf-8")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, encoding="utf-8", timeout=timeout)
