"""benchmarks/nanogpt_race.py, command_profile.py, step_race.py and compile_race.py: the
commands they run, what they parse from the output, and the JSON they write (never the times
themselves)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import app

from benchmarks import command_profile, compile_race, nanogpt_race, step_race
from conftest import TINY_TEXT

REPO = Path(__file__).resolve().parents[1]


def test_at_2000_steps_both_commands_are_the_recipes_own():
  """Catches the smoke-run overrides leaking into the real recipe's commands."""
  assert nanogpt_race.gpt2jax_args(Path("/t.txt"), 2000) == [
      "--config=configs/shakespeare_char_cpu.py", "--config.data.path=/t.txt"]
  assert " ".join(nanogpt_race.nanogpt_args(2000)) == (
      "config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 "
      "--log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 "
      "--max_iters=2000 --lr_decay_iters=2000 --dropout=0.0")


def test_dropout_reaches_both_sides_and_zero_keeps_the_recipe():
  """Catches --dropout raced on one side only, or changing the recipe's own commands."""
  assert "--config.model.dropout=0.2" in nanogpt_race.gpt2jax_args(Path("t"), 2000, 0.2)
  assert "--dropout=0.2" in nanogpt_race.nanogpt_args(2000, 0.2)
  assert nanogpt_race.gpt2jax_args(Path("t"), 2000, 0.0) == nanogpt_race.gpt2jax_args(
      Path("t"), 2000)
  assert "--dropout=0.0" in nanogpt_race.nanogpt_args(2000, 0.0)


def test_steps_scale_both_schedules_alike():
  assert nanogpt_race.nanogpt_args(16)[-4:] == [
      "--lr_decay_iters=16", "--dropout=0.0", "--eval_interval=2", "--warmup_iters=1"]
  assert nanogpt_race.gpt2jax_args(Path("t"), 16)[2:] == [
      "--config.train.num_steps=16", "--config.train.decay_steps=16",
      "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
      "--config.train.warmup_steps=1"]
  with pytest.raises(app.UsageError, match="multiple of 8"):
    nanogpt_race.schedule(12)


def test_the_final_validation_loss_is_read_from_each_sides_output():
  nanogpt_lines = [(0.0, "step 0: train loss 4.1676, val loss 4.1649"),
                   (1.0, "iter 0: loss 4.1828, time 20.16ms, mfu -100.00%"),
                   (2.0, "step 16: train loss 3.1436, val loss 3.1772")]
  gpt2jax_lines = [(0.0, "step 16: loss 3.1000, lr 1.00e-04, 5,374 tokens/s"),
                   (1.0, "step 16: train 3.1500, val 3.1751 (perplexity 23.9, 4.5 bits/byte)")]
  assert nanogpt_race.final_val_loss(nanogpt_lines, nanogpt_race._NANOGPT_EVAL, 16) == 3.1772
  assert nanogpt_race.final_val_loss(gpt2jax_lines, nanogpt_race._GPT2JAX_EVAL, 16) == 3.1751
  with pytest.raises(RuntimeError, match=r"at step 2000 \(seen at steps \[0, 16\]\)"):
    nanogpt_race.final_val_loss(nanogpt_lines, nanogpt_race._NANOGPT_EVAL, 2000)


def test_a_missing_nanogpt_side_names_the_flags(tmp_path):
  with pytest.raises(SystemExit, match="--nanogpt_dir and --torch_python.*--gpt2jax_only"):
    nanogpt_race.check_nanogpt(None, None)
  with pytest.raises(SystemExit, match=r"give --torch_python"):
    nanogpt_race.check_nanogpt(str(tmp_path), "")
  with pytest.raises(SystemExit, match=r"not a nanoGPT checkout \(no train.py, model.py"):
    nanogpt_race.check_nanogpt(str(tmp_path), sys.executable)


def test_phases_charge_the_wall_time_from_the_lines_and_metrics():
  """Catches a phase charged to the wrong span, e.g. a save taking an evaluation's time or the
  steps' time counted twice. 4 steps, batch x block = 100 tokens, log/eval/save every 2."""
  lines = [(1.0, command_profile.IMPORT_MARK),
           (3.0, "corpus 'text': 1 documents, ..."), (3.1, "model: 4 layers, ..."),
           (5.0, "step 0: train 4.2, val 4.2 (perplexity 66.8, 6.0 bits/byte)"),
           (9.0, "train step compiled in 7.5 s"),
           (10.0, "step 2: loss 3.8, lr 1.0e-03, 200 tokens/s"),  # 2 steps in 1 s
           (10.5, "step 2: train 3.5, val 3.6 (perplexity 36.6, 5.2 bits/byte)"),
           (12.7, "step 4: loss 3.1, lr 1.0e-04, 100 tokens/s"),  # 2 steps in 2 s
           (13.5, "step 4: train 3.0, val 3.1 (perplexity 22.2, 4.5 bits/byte)"),
           (14.0, "trained to step 4; checkpoints in ...")]
  records = [{"step": 0, "val_loss": 4.2}, {"step": 2, "tokens_per_second": 200.0},
             {"step": 4, "tokens_per_second": 100.0}]
  p = command_profile.phases(lines, 15.0, records, tokens_per_step=100)
  assert p["imports"] == 1.0 and p["setup"] == pytest.approx(2.1)
  assert p["step0_evaluation"] == pytest.approx(1.9) and p["train_step_compile"] == 4.0
  assert p["train_step_compile_reported"] == 7.5
  assert p["training_steps"] == 3.0 and p["steps"] == 4
  assert p["first_interval_ms_per_step"] == 500.0 and p["median_ms_per_step"] == 1000.0
  assert p["evaluations"] == {2: 0.5, 4: pytest.approx(0.8)}
  assert p["checkpoint_saves"] == {2: pytest.approx(0.2)}  # 12.7 - 10.5 - 2 s of steps
  assert p["final_save"] == 0.5 and p["final_report"] == 1.0
  assert p["other"] == pytest.approx(15.0 - 1 - 2.1 - 1.9 - 4 - 3 - 0.5 - 0.8 - 0.2 - 0.5 - 1)
  assert "| 1 checkpoint saves, blocking part (each 0.20-0.20 s) | 0.20 | 1.3% |" in (
      command_profile.table(p))


def _text(tmp_path: Path) -> Path:
  path = tmp_path / "text.txt"
  path.write_text(TINY_TEXT * 40, encoding="utf-8")  # ~200 KB: 20 batches of 12 x 65 to validate
  return path


@pytest.mark.slow
def test_the_race_runs_gpt2jax_cold_and_warm_and_writes_its_json(tmp_path):
  """Catches the race no longer running the recipe (a config or flag it passes changed), a
  final validation loss or phase it no longer finds in the output, or a JSON that misses
  what README reads. The nanoGPT side runs only where GPT2JAX_TEST_NANOGPT_DIR and
  GPT2JAX_TEST_TORCH_PYTHON name a nanoGPT checkout and a Python with torch."""
  nanogpt = [os.environ.get("GPT2JAX_TEST_NANOGPT_DIR"),
             os.environ.get("GPT2JAX_TEST_TORCH_PYTHON")]
  sides = ([f"--nanogpt_dir={nanogpt[0]}", f"--torch_python={nanogpt[1]}"] if all(nanogpt)
           else ["--gpt2jax_only"])
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.nanogpt_race", f"--text={_text(tmp_path)}",
       "--steps=16", "--rounds=1", f"--out={tmp_path / 'out'}", *sides],
      cwd=REPO, capture_output=True, text=True, encoding="utf-8", timeout=900)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  (written,) = (tmp_path / "out").glob("nanogpt-race-*.json")
  report = json.loads(written.read_text(encoding="utf-8"))
  assert report["steps"] == 16 and report["machine"]["load_average"]
  (race_round,) = report["rounds"]
  cold, warm = race_round["runs"]["gpt2jax_cold"], race_round["runs"]["gpt2jax_warm"]
  assert cold["val_loss"] == warm["val_loss"] < math.log(len(set(TINY_TEXT)))  # it learned
  for run in (cold, warm):
    assert run["wall_seconds"] > 0 and run["load_before"] is not None
    phases = run["phases"]
    assert phases["steps"] == 16 and phases["final_save"] is not None
    assert sorted(map(int, phases["evaluations"])) == [2, 4, 6, 8, 10, 12, 14, 16]
    assert sorted(map(int, phases["checkpoint_saves"])) == [2, 4, 6, 8, 10, 12, 14]
  if all(nanogpt):
    assert race_round["runs"]["nanogpt"]["val_loss"] < 4.2
    assert set(race_round["ratios"]) == {"gpt2jax_cold/nanogpt", "gpt2jax_warm/nanogpt"}
    assert report["torch"]["threads"] == 2
  else:
    assert "nanogpt" not in race_round["runs"] and "ratios" not in race_round
  assert "| 1 (" in done.stdout and f"wrote {written}" in done.stdout


@pytest.mark.slow
def test_the_race_without_nanogpt_flags_says_which_to_give(tmp_path):
  done = subprocess.run([sys.executable, "-m", "benchmarks.nanogpt_race",
                         f"--text={_text(tmp_path)}", "--torch_python=python"],
                        cwd=REPO, capture_output=True, text=True, encoding="utf-8", timeout=120)
  assert done.returncode != 0
  assert done.stderr.strip().startswith("error: give --nanogpt_dir: --nanogpt_dir=<a checkout")


@pytest.mark.slow
def test_the_command_profile_marks_the_end_of_train_pys_imports(tmp_path):
  """Catches the import mark not printed (train_with_import_mark.py broken or its mark out of
  step with command_profile's) and a profile that no longer adds up to the wall time."""
  overrides = [f"--override=--config.train.{k}={v}" for k, v in
               (("num_steps", 8), ("decay_steps", 8), ("warmup_steps", 1), ("eval_every", 4),
                ("checkpoint_every", 4), ("log_every", 2))]
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.command_profile", f"--text={_text(tmp_path)}",
       "--nowarm", f"--out={tmp_path}", *overrides],
      cwd=REPO, capture_output=True, text=True, encoding="utf-8", timeout=600)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  (written,) = tmp_path.glob("command-profile-*.json")
  profile = json.loads(written.read_text(encoding="utf-8"))["runs"]["cold"]
  assert 0 < profile["imports"] < profile["wall"]
  assert all(profile[k] > 0 for k in ("setup", "step0_evaluation", "training_steps",
                                      "final_report"))
  assert sorted(map(int, profile["evaluations"])) == [4, 8]
  assert list(profile["checkpoint_saves"]) == ["4"]
  assert "| imports (process start to import mark) |" in done.stdout


def test_a_step_race_variant_names_a_checkout_and_a_dtype(tmp_path):
  assert str(step_race.Variant.parse(".:bfloat16:0.2")) == ".:bfloat16:0.2"
  assert step_race.Variant.parse(f"{REPO}:float32").dropout is None
  with pytest.raises(app.UsageError, match="not CHECKOUT:DTYPE"):
    step_race.Variant.parse(".:float64")
  with pytest.raises(app.UsageError, match="not a gpt2jax checkout.*git worktree add"):
    step_race.Variant.parse(f"{tmp_path}:float32")


@pytest.mark.slow
def test_the_step_race_runs_every_variant_in_turn_and_writes_its_json(tmp_path):
  """Catches a variant's step not built from its own checkout (the modules of the one before
  kept), or a JSON that misses what README reads."""
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.step_race", "--shape=R", "--rounds=2", "--steps=1",
       "--variants=.:float32,.:bfloat16,.:float32:0.2", f"--out={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, encoding="utf-8", timeout=600)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  (written,) = tmp_path.glob("step-race-R-*.json")
  report = json.loads(written.read_text(encoding="utf-8"))
  assert [v["variant"] for v in report["variants"]] == [
      ".:float32", ".:bfloat16", ".:float32:0.2"]
  assert all(len(v["block_ms"]) == 2 and v["median_ms"] > 0 for v in report["variants"])
  assert report["variants"][0]["speed_vs_first"] == 1.0
  assert "| .:bfloat16 |" in done.stdout


def test_compile_race_takes_only_checkouts_and_sums_its_phases(tmp_path):
  """Catches a non-checkout accepted, a total that is not the phases' sum per round, and a
  table that drops a phase."""
  assert compile_race.checkout_path(".") == REPO
  with pytest.raises(ValueError, match="not a gpt2jax checkout.*git worktree add"):
    compile_race.checkout_path(str(tmp_path))
  rounds = [{phase: {"wall": 1.0 + i, "cpu": 2.0} for phase in compile_race.PHASES}
            for i in range(3)]
  (summary,) = compile_race.summarize([rounds])
  assert summary["train compile"] == {"wall": 2.0, "cpu": 2.0}
  assert summary["total"]["wall"] == 2.0 * len(compile_race.PHASES)
  text = compile_race.table(["."], [summary])
  assert all(f"| {phase} |" in text for phase in (*compile_race.PHASES, "total"))


@pytest.mark.slow
def test_the_compile_race_times_every_program_of_each_checkout(tmp_path):
  """Runs the real measuring processes on a tiny config. Catches a phase missing from the
  JSON, a process that measured another checkout's programs, or a failing child."""
  config = tmp_path / "tiny.py"
  config.write_text(
      "from configs import default\n\n\ndef get_config():\n  config = default.get_config()\n"
      "  config.model.update(n_layer=1, n_head=2, n_embd=32, block_size=16)\n"
      "  config.train.batch_size = 4\n  return config\n", encoding="utf-8")
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.compile_race", f"--checkouts=.,{REPO}", "--rounds=1",
       f"--config={config}", "--vocab_size=50", f"--out={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, encoding="utf-8", timeout=600)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  (written,) = tmp_path.glob("compile-race-*.json")
  report = json.loads(written.read_text(encoding="utf-8"))
  assert [c["checkout"] for c in report["checkouts"]] == [".", "."]
  for checkout in report["checkouts"]:
    (measured,) = checkout["rounds"]
    assert set(measured) == set(compile_race.PHASES)
    assert all(seconds["wall"] > 0 and seconds["cpu"] > 0 for seconds in measured.values())
  assert "| train compile |" in done.stdout
