"""Bad input gives one clear message, exit status 1, no traceback, and leaves the workdir as it was.

Errors raised by the library are checked through cli.run_main (what train.py and sample.py
run) in this process; errors of the command line itself through the scripts.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, tiny_config
from gpt2jax import cli, errors, parallel, runs, sampling, steps, train_lib
from gpt2jax.checkpoint import Checkpoints
from gpt2jax.nonfinite import NonfiniteGuard, all_finite
from gpt2jax.tokenizer import load_tokenizer
from gpt2jax.workdir import CHECKPOINT_DIR, CONFIG_JSON, LOCK_FILE, TOKENIZER_DIR, WorkdirLock


def snapshot(workdir: Path) -> dict:
  """Content and modification time of every file (the lock file aside)."""
  return {str(p.relative_to(workdir)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                        p.stat().st_mtime_ns)
          for p in sorted(workdir.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def assert_one_clear_error(code: int, stderr: str, *words: str) -> None:
  assert code == 1, stderr
  assert "Traceback" not in stderr
  assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) <= 2, stderr
  for word in words:
    assert word in stderr, (word, stderr)


def run_cli(main, capsys) -> tuple[int, str]:
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    cli.run_main(main)
  return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def workdir(trained_workdir, tmp_path_factory) -> Path:
  """A copy of the trained tiny workdir (checkpoints at 20 and 40) for the tests to misuse."""
  copy = tmp_path_factory.mktemp("misused") / "run"
  shutil.copytree(trained_workdir, copy)
  return copy


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
  root = tmp_path_factory.mktemp("corpora")
  files = {"empty": b"", "latin1": "shalom caf\u00e9\n".encode("latin-1"),
           "short": b"a few words\n\nand more"}
  for name, content in files.items():
    (root / f"{name}.txt").write_bytes(content)
  return {name: root / f"{name}.txt" for name in files} | {"missing": root / "missing.txt"}


# (config overrides, words the message must hold); each is tried on the trained workdir.
RESUME_CASES = {
    "missing corpus": (dict(data__path="missing"), ["missing.txt", "does not exist",
                                                    "--config.data.path"]),
    "empty corpus": (dict(data__path="empty"), ["empty.txt", "is empty"]),
    "non-UTF-8 corpus": (dict(data__path="latin1"), ["latin1.txt", "is not UTF-8",
                                                     "0xe9 on line 1", "iconv"]),
    "n_embd not divisible by n_head": (dict(model__n_head=3), [
        "model.n_embd=32 is not divisible by model.n_head=3"]),
    "another model shape": (dict(model__n_layer=3), [
        "differently shaped model (model.n_layer: 2 -> 3)", "new --workdir"]),
    "another tokenizer": (dict(tokenizer__kind="bpe"), [
        "a model with another tokenizer (tokenizer.kind: 'char' -> 'bpe')", "new --workdir"]),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_bad_training_input_leaves_the_workdir_untouched(case, workdir, tiny_text_file,
                                                          corpora, capsys):
  overrides, words = RESUME_CASES[case]
  overrides = {k: str(corpora[v]) if k == "data__path" else v for k, v in overrides.items()}
  before = snapshot(workdir)
  config = tiny_config(tiny_text_file, train__num_steps=60, **overrides)
  code, stderr = run_cli(lambda: train_lib.train_and_evaluate(config, workdir), capsys)
  assert_one_clear_error(code, stderr, *words)
  assert snapshot(workdir) == before


FRESH_CASES = {
    "training split shorter than block_size+1": (
        dict(data__path="short"), ["training split has", "fewer than block_size+1 = 33"]),
    "validation split shorter than block_size+1": (
        dict(model__block_size=1000), [
            "validation split has", "--config.data.val_fraction"]),
    "BPE vocabulary too large": (dict(tokenizer__kind="bpe", tokenizer__vocab_size=50000), [
        "tokenizer.vocab_size=50000 is too large for this corpus (at most"]),
    "BPE vocabulary too small": (dict(tokenizer__kind="bpe", tokenizer__vocab_size=100), [
        "tokenizer.vocab_size=100 is too small"]),
}


@pytest.mark.parametrize("case", FRESH_CASES)
def test_bad_input_for_a_new_run_writes_no_checkpoint_or_config(case, tmp_path, tiny_text_file,
                                                                corpora, capsys):
  overrides, words = FRESH_CASES[case]
  overrides = {k: str(corpora[v]) if k == "data__path" else v for k, v in overrides.items()}
  config = tiny_config(tiny_text_file, **overrides)
  code, stderr = run_cli(lambda: train_lib.train_and_evaluate(config, tmp_path / "new"),
                         capsys)
  assert_one_clear_error(code, stderr, *words)
  assert not (tmp_path / "new" / CONFIG_JSON).exists()
  assert list((tmp_path / "new" / CHECKPOINT_DIR).iterdir()) == []


def test_a_workdir_in_use_or_a_file_is_refused(workdir, tiny_text_file, capsys):
  before = snapshot(workdir)
  config = tiny_config(tiny_text_file, train__num_steps=60)
  with WorkdirLock(workdir):  # another training run holds it
    code, stderr = run_cli(lambda: train_lib.train_and_evaluate(config, workdir), capsys)
  assert_one_clear_error(code, stderr, "in use by another training run", f"pid {os.getpid()}")
  code, stderr = run_cli(
      lambda: train_lib.train_and_evaluate(config, workdir / CONFIG_JSON), capsys)
  assert_one_clear_error(code, stderr, "config.json is a file, not a directory")
  assert snapshot(workdir) == before


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(workdir, tiny_text_file,
                                                                  capsys):
  checkpoints_before = {k: v for k, v in snapshot(workdir).items() if k.startswith("checkpoints")}
  absurd = tiny_config(tiny_text_file, train__num_steps=60, train__learning_rate=1e6)
  code, stderr = run_cli(lambda: train_lib.train_and_evaluate(absurd, workdir), capsys)
  assert int(re.search(r"Training diverged at step (\d+) ", stderr).group(1)) > 40
  assert_one_clear_error(code, stderr, "gradient norm nan",
                         f"last good checkpoint is {workdir.absolute()}/checkpoints/40",
                         "learning rate too high", "train.learning_rate=1e+06",
                         "skip_nonfinite=True")
  after = {k: v for k, v in snapshot(workdir).items() if k.startswith("checkpoints")}
  assert after == checkpoints_before  # nothing saved after the divergence

  config = tiny_config(tiny_text_file, train__num_steps=41)
  resumed = train_lib.train_and_evaluate(config, workdir)  # the rerun resumes from step 40
  assert int(resumed.step) == 41 and all_finite(resumed.params)
  assert "resuming from step 40" in capsys.readouterr().out


def test_skip_nonfinite_drops_the_update_but_counts_the_step(tiny_text_file, tmp_path):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from gpt2jax import optim
  from gpt2jax.model import GPT, GPTConfig

  # The trained fixture's model and step (jitted the same way), so most programs are cached.
  config = tiny_config(tiny_text_file)
  model = GPT(GPTConfig.from_config(config.model, vocab_size=48))
  optimizer = optim.make_optimizer(config.train)
  state = steps.init_train_state(model, optimizer, seed=0)
  poisoned = jax.device_get(state.replace(params=jax.tree.map(
      lambda x: x.at[(0,) * x.ndim].set(jnp.inf), state.params)))  # an infinite weight
  batch = jnp.ones((8, config.model.block_size + 1), jnp.int32)
  schedule = optim.learning_rate_schedule(config.train)
  for skip in (True, False):
    step = jax.jit(steps.make_train_step(model, optimizer, schedule, config.seed,
                                         skip_nonfinite=skip), donate_argnums=0)
    new_state, metrics = step(jax.device_put(poisoned, jax.local_devices()[0]), batch)
    assert bool(metrics["nonfinite"]) and int(new_state.step) == 1
    unchanged = [np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(new_state),
                                                      jax.tree_util.tree_leaves(poisoned))]
    assert all(unchanged[1:]) == skip  # params and optimizer state kept only when skipping
  # The loop's guard refuses to save such parameters (a checkpoint is a state to resume from).
  guard = NonfiniteGuard(config, Checkpoints(tmp_path, async_save=False))
  guard.check_params(state.params, 1)
  with pytest.raises(errors.TrainingDiverged, match="Not saving checkpoint 1"):
    guard.check_params(poisoned.params, 1)


@pytest.mark.parametrize("value, finite", [(np.inf, False), (-np.inf, False), (np.nan, False),
                                          (3e38, True)])  # (3e38: sums overflow, values do not)
def test_all_finite_finds_one_nonfinite_value_among_many_large_ones(value, finite):
  tree = {"a": np.full((4, 5), 3e38, np.float32), "b": np.ones(7, np.float32),
          "c": np.arange(3, dtype=np.int32)}
  tree["b"][3] = value
  assert all_finite(tree) == finite


SAMPLING_CASES = {
    "temperature < 0": (dict(temperature=-0.5), "--temperature must be >= 0"),
    "top_p = 0": (dict(top_p=0.0), "--top_p must be in (0, 1]"),
    "top_p > 1": (dict(top_p=1.5), "--top_p must be in (0, 1]"),
    "top_k < 0": (dict(top_k=-1), "--top_k must be >= 0"),
    "max_new_tokens < 1": (dict(max_new_tokens=0), "--max_new_tokens must be at least 1"),
}


@pytest.mark.parametrize("case", SAMPLING_CASES)
def test_bad_sampling_options_are_one_line(case, workdir, capsys):
  options, words = SAMPLING_CASES[case]
  before = snapshot(workdir)
  loaded = runs.load_model(workdir)
  code, stderr = run_cli(lambda: sampling.complete_prompts(
      loaded, ["ROMEO"], sampling.SamplingOptions(**options)), capsys)
  assert_one_clear_error(code, stderr, words)
  assert snapshot(workdir) == before


def test_sampling_a_workdir_without_checkpoints_or_config(workdir, tmp_path, capsys):
  untrained = tmp_path / "untrained"  # config and tokenizer written, killed before step 1
  untrained.mkdir()
  shutil.copy(workdir / CONFIG_JSON, untrained)
  shutil.copytree(workdir / TOKENIZER_DIR, untrained / TOKENIZER_DIR)
  before = snapshot(untrained)
  code, stderr = run_cli(lambda: runs.load_model(untrained), capsys)
  assert_one_clear_error(code, stderr, "holds no checkpoint yet", "train it first")
  assert snapshot(untrained) == before and not (untrained / CHECKPOINT_DIR).exists()
  code, stderr = run_cli(lambda: runs.load_model(tmp_path), capsys)
  assert_one_clear_error(code, stderr, "holds no config.json", "python train.py --config=")


def test_a_tokenizer_file_cannot_point_outside_the_workdir(tmp_path):
  (tmp_path / "tokenizer.json").write_text(
      '{"kind": "bpe", "eos_id": 1, "pad_id": 2, "model_file": "../../etc/passwd"}',
      encoding="utf-8")
  with pytest.raises(errors.UserError, match="must be a file name in"):
    load_tokenizer(tmp_path)


def test_the_product_never_unpickles():
  sources = [*(REPO / "gpt2jax").rglob("*.py"), REPO / "train.py", REPO / "sample.py"]
  unpickling = re.compile(r"import (cloud)?pickle|from (cloud)?pickle|pickle\.loads?\(|"
                          r"allow_pickle\s*=\s*True|np\.load\(|torch\.load\(|joblib")
  for path in sources:
    found = unpickling.search(path.read_text(encoding="utf-8"))
    assert found is None, f"{path.name}: {found.group(0)}"


# Command-line mistakes, through the scripts: (script, arguments, words of the message).
SCRIPT_CASES = {
    "unknown config key": ("train.py", ["--config.model.n_layers=3"], [
        "--config.model.n_layers: config.model has no key 'n_layers'",
        "Did you mean --config.model.n_layer?"]),
    "unknown config section": ("train.py", ["--config.modle.n_layer=3"], [
        "the config has no key 'modle'", "Did you mean --config.model?"]),
    "integer expected": ("train.py", ["--config.model.n_layer=two"], [
        "--config.model.n_layer=two: expected an integer."]),
    "boolean expected": ("train.py", ["--config.model.bias=maybe"], [
        "--config.model.bias=maybe: expected true or false."]),
    "number expected": ("sample.py", ["--temperature=hot"], ["--temperature=hot: expected a number."]),
    "missing config file": ("train.py", ["--config=configs/nope.py"], [
        "--config=configs/nope.py: no such file"]),
    "broken config file": ("train.py", ["--config={broken}"], [
        "could not be loaded: SyntaxError", "--verbose shows the traceback"]),
    "no config": ("train.py", [], ["--config is required"]),
}


@pytest.fixture(scope="module")
def script_results(tmp_path_factory, trained_workdir):
  """Runs every SCRIPT_CASES command side by side; the workdir must not change."""
  root = tmp_path_factory.mktemp("scripts")
  broken = root / "broken.py"
  broken.write_text("def get_config(:\n", encoding="utf-8")
  before = snapshot(trained_workdir)
  env = dict(os.environ, PYTHONIOENCODING="utf-8")
  processes = {}
  for case, (script, args, _) in SCRIPT_CASES.items():
    args = [a.format(broken=broken) for a in args]
    if script == "train.py" and not any(a.startswith("--config=") for a in args) and args:
      args = ["--config=configs/shakespeare_char.py", *args]
    processes[case] = subprocess.Popen(
        [sys.executable, str(REPO / script), f"--workdir={trained_workdir}", *args], cwd=REPO,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
  results = {case: (p.wait(timeout=300), p.communicate()[1]) for case, p in processes.items()}
  assert snapshot(trained_workdir) == before
  return results


@pytest.mark.slow
@pytest.mark.parametrize("case", SCRIPT_CASES)
def test_command_line_mistakes_are_one_line(case, script_results):
  code, stderr = script_results[case]
  assert_one_clear_error(code, stderr, *SCRIPT_CASES[case][2])


def test_interrupts_and_os_errors_outside_the_loop_are_one_line(capsys):
  def interrupted():
    raise KeyboardInterrupt

  def unwritable():
    raise PermissionError(13, "Permission denied", "/runs/x/config.json")

  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    cli.run_main(interrupted)
  assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted\n"
  code, stderr = run_cli(unwritable, capsys)
  assert_one_clear_error(code, stderr, "Permission denied: /runs/x/config.json")


@pytest.mark.parametrize("sizes, devices, expected", [
    (dict(data=-1, fsdp=1), 8, dict(data=8, fsdp=1)),
    (dict(data=2, fsdp=-1), 8, dict(data=2, fsdp=4)),
    (dict(data=4, fsdp=2), 8, dict(data=4, fsdp=2)),
])
def test_mesh_shapes_that_fit_the_devices(sizes, devices, expected):
  assert parallel.resolve_mesh_shape(sizes, devices) == expected


@pytest.mark.parametrize("sizes, devices, words", [
    (dict(data=3, fsdp=1), 8, "mesh.data=3 x mesh.fsdp=1 needs 3 devices, but there are 8"),
    (dict(data=-1, fsdp=3), 8, "the 8 devices do not split into groups of 3"),
    (dict(data=-1, fsdp=-1), 8, "at most one may be -1"),
    (dict(data=0, fsdp=1), 8, "each mesh size must be at least 1"),
])
def test_mesh_shapes_that_do_not_fit_are_refused(sizes, devices, words):
  with pytest.raises(errors.UserError, match=words.replace("(", r"\(")):
    parallel.resolve_mesh_shape(sizes, devices)


def test_batch_sizes_must_split_over_the_data_parallel_devices():
  parallel.check_batch_divides(32, 8)
  parallel.check_batch_divides(32, 4, grad_accum_steps=2)
  with pytest.raises(errors.UserError, match=r"train.batch_size=30 is not divisible by the "
                     r"8-way data parallelism .* e.g. --config.train.batch_size=32"):
    parallel.check_batch_divides(30, 8)
  with pytest.raises(errors.UserError, match=r"micro-batch 12 \(batch_size / grad_accum_steps\)"
                     r" is not divisible by the 8-way .* e.g. --config.train.batch_size=32"):
    parallel.check_batch_divides(24, 8, grad_accum_steps=2)
  with pytest.raises(errors.UserError, match="not divisible by train.grad_accum_steps=3"):
    parallel.check_batch_divides(32, 8, grad_accum_steps=3)
