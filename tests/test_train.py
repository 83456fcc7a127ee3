import json

import jax
import numpy as np
import pytest

from conftest import REPO, run_script, tiny_config
from gpt2jax import train_lib
from gpt2jax.errors import UserError
from gpt2jax.metrics import read_metrics


def test_tiny_run_learns_and_writes_its_workdir(trained_workdir):
  records = read_metrics(trained_workdir)
  evals = [r for r in records if "val_loss" in r]
  assert [r["step"] for r in evals] == [0, 20, 40]
  assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
  for key in ("train_loss", "val_perplexity", "val_bits_per_byte", "learning_rate",
              "tokens_per_second"):
    assert key in evals[-1]
  assert evals[-1]["val_perplexity"] == pytest.approx(np.exp(evals[-1]["val_loss"]), rel=1e-6)
  for name in ("config.json", "tokenizer/tokenizer.json", "samples.txt", "data/tokens.json"):
    assert (trained_workdir / name).exists(), name
  assert sorted(p.name for p in (trained_workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == ["20", "40"]
  assert json.loads((trained_workdir / "config.json").read_text())["model"]["n_embd"] == 32


def test_resume_continues_from_the_last_checkpoint(tmp_path, tiny_text_file):
  config = tiny_config(tiny_text_file, train__decay_steps=40,  # same schedule for both
                       model__dropout=0.1)
  config.train.num_steps = 20  # as if interrupted after the checkpoint at step 20
  train_lib.train_and_evaluate(config, tmp_path)
  config.train.num_steps = 40
  resumed = train_lib.train_and_evaluate(config, tmp_path)
  assert int(resumed.step) == 40
  steps = [r["step"] for r in read_metrics(tmp_path)]
  assert steps == sorted(steps) and steps.count(20) == 1 and steps[-1] == 40

  uninterrupted = train_lib.train_and_evaluate(config, tmp_path / "straight")
  for a, b in zip(jax.tree_util.tree_leaves(resumed.params),
                  jax.tree_util.tree_leaves(uninterrupted.params)):
    np.testing.assert_array_equal(a, b)  # same batches, dropout and optimizer state


def test_resuming_with_another_model_shape_is_refused(trained_workdir, tiny_text_file):
  before = sorted(p.name for p in trained_workdir.rglob("*"))
  config = tiny_config(tiny_text_file, model__n_layer=3)
  with pytest.raises(UserError, match=r"model.n_layer: 2 -> 3"):
    train_lib.train_and_evaluate(config, trained_workdir)
  assert sorted(p.name for p in trained_workdir.rglob("*")) == before


@pytest.mark.slow
def test_train_script_defaults_workdir_to_runs_config_name_and_resumes(tmp_path, tiny_text_file):
  args = ["--config=" + str(REPO / "configs" / "shakespeare_char.py"),
          f"--config.data.path={tiny_text_file}", "--config.model.n_layer=1",
          "--config.model.n_head=2", "--config.model.n_embd=16", "--config.model.block_size=16",
          "--config.model.dropout=0.0", "--config.train.batch_size=4",
          "--config.train.num_steps=6", "--config.train.warmup_steps=2",
          "--config.train.eval_every=3", "--config.train.checkpoint_every=3",
          "--config.train.eval_batches=1", "--config.train.sample_tokens=8"]
  first = run_script("train.py", *args, cwd=tmp_path)
  assert first.returncode == 0, first.stderr
  workdir = tmp_path / "runs" / "shakespeare_char"
  assert "step 6: train" in first.stdout and (workdir / "checkpoints" / "6").is_dir()

  again = run_script("train.py", *args[:-4], "--config.train.num_steps=9",
                     "--config.train.eval_every=3", "--config.train.checkpoint_every=3",
                     "--config.train.eval_batches=1", cwd=tmp_path)
  assert again.returncode == 0, again.stderr
  assert "resuming from step 6" in again.stdout and "step 9: train" in again.stdout
