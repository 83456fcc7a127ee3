"""gpt2jax/metrics.py: what a run reports — TensorBoard events, summary.json, MFU."""

import json

import pytest

from gpt2jax import metrics


def read_tensorboard(logdir):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  events = EventAccumulator(str(logdir))
  events.Reload()
  return events


def test_training_writes_tensorboard_events_with_every_metric(trained_workdir):
  events = read_tensorboard(trained_workdir / "tensorboard")
  scalars = set(events.Tags()["scalars"])
  for tag in ("train/loss", "train/perplexity", "train/bits_per_byte", "val/loss",
              "val/perplexity", "val/bits_per_byte", "optim/learning_rate", "optim/grad_norm",
              "speed/tokens_per_second", "speed/model_tflops_per_second"):
    assert tag in scalars, tag
  records = metrics.read_metrics(trained_workdir)
  for key in ("tokens_seen", "eval_train_bits_per_byte", "model_tflops_per_second"):
    assert key in records[-1], key
  val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
  logged = [(e.step, e.value) for e in events.Scalars("val/loss")]
  assert [s for s, _ in logged] == [s for s, _ in val] == [0, 20, 40]
  assert [v for _, v in logged] == pytest.approx([v for _, v in val], rel=1e-6)
  assert {"samples/text_summary", "config/text_summary"} <= set(events.Tags()["tensors"])
  config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0]
  assert json.loads(config_text.decode("utf-8").strip("`\n"))["model"]["n_embd"] == 32
  sample = events.Tensors("samples/text_summary")[-1]
  assert sample.step == 40
  assert sample.tensor_proto.string_val[0].decode("utf-8").strip("`\n") in (
      trained_workdir / "samples.txt").read_text(encoding="utf-8")


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tmp_path):
  first = metrics.MetricsLog(tmp_path, keep_through_step=None)
  for step in (1, 2, 3, 4):
    first.write({"step": step, "train_loss": 10.0 + step})
  first.close()  # as if it crashed after step 4 with a checkpoint at step 2
  resumed = metrics.MetricsLog(tmp_path, keep_through_step=2)
  for step in (3, 4, 5):
    resumed.write({"step": step, "train_loss": 20.0 + step})
  resumed.close()
  logged = [(e.step, e.value) for e in read_tensorboard(tmp_path / "tensorboard")
            .Scalars("train/loss")]
  assert logged == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0), (5, 25.0)]
  fresh = metrics.MetricsLog(tmp_path, keep_through_step=None)  # a new run in the same dir
  fresh.write({"step": 1, "train_loss": 1.0})
  fresh.close()
  assert [(e.step, e.value) for e in read_tensorboard(tmp_path / "tensorboard")
          .Scalars("train/loss")] == [(1, 1.0)]


def test_summary_json_describes_the_finished_run(trained_workdir):
  summary = json.loads((trained_workdir / "summary.json").read_text(encoding="utf-8"))
  records = metrics.read_metrics(trained_workdir)
  val_losses = [r["val_loss"] for r in records if "val_loss" in r]
  assert summary["steps"] == 40 and summary["tokens_seen"] == 40 * 8 * 32
  assert summary["best_val_loss"] == min(val_losses)
  assert summary["final_val_loss"] == val_losses[-1] and summary["final_val_step"] == 40
  assert summary["final_val_bits_per_byte"] == records[-1]["val_bits_per_byte"]
  assert summary["num_parameters"] > 10_000
  assert summary["wall_seconds"] > 0 and summary["mean_tokens_per_second"] > 0


def test_summary_adds_up_time_and_tokens_over_resumed_sessions():
  records = [
      {"step": 0, "val_loss": 5.0, "val_perplexity": 148.4, "val_bits_per_byte": 2.0},
      {"step": 10, "tokens_per_second": 100.0, "elapsed_seconds": 12.0, "train_loss": 4.0},
      {"step": 20, "tokens_per_second": 200.0, "elapsed_seconds": 20.0, "train_loss": 3.0,
       "val_loss": 3.5, "val_perplexity": 33.1, "val_bits_per_byte": 1.5},
      # resumed from step 20: elapsed time starts again
      {"step": 30, "tokens_per_second": 100.0, "elapsed_seconds": 11.0, "train_loss": 2.5,
       "val_loss": 3.6, "val_perplexity": 36.6, "val_bits_per_byte": 1.6},
  ]
  summary = metrics.summarize_run(records, num_params=123, tokens_per_step=50)
  assert summary["wall_seconds"] == pytest.approx(31.0)
  # 1500 tokens in 5 + 2.5 + 5 seconds
  assert summary["mean_tokens_per_second"] == pytest.approx(1500 / 12.5)
  assert (summary["best_val_step"], summary["best_val_loss"]) == (20, 3.5)
  assert (summary["final_val_step"], summary["final_val_loss"]) == (30, 3.6)
  assert summary["tokens_seen"] == 1500 and summary["final_train_loss"] == 2.5


