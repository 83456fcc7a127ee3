"""What a run reports: metrics.jsonl, TensorBoard events, samples.txt, summary.json, console
lines and a progress bar.

Only process 0 writes; other processes get the same objects with writing turned off.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from gpt2jax.flops import utilization
from gpt2jax.workdir import (METRICS_JSONL, SAMPLES_TXT, SUMMARY_JSON, TENSORBOARD_DIR,
                             write_atomic)

LN2 = math.log(2.0)


def perplexity(loss: float) -> float:
  """exp(loss), capped so that a diverged loss does not overflow."""
  return math.exp(min(loss, 80.0))


def loss_summary(prefix: str, loss: float, bytes_per_token: float) -> dict:
  """Loss in nats per token, perplexity and bits per byte (comparable across tokenizers)."""
  return {
      f"{prefix}_loss": loss,
      f"{prefix}_perplexity": perplexity(loss),
      f"{prefix}_bits_per_byte": loss / LN2 / bytes_per_token,
  }


class MetricsLog:
  """Appends one JSON object per line to <workdir>/metrics.jsonl, mirrored to TensorBoard.

  With flops_per_token (see gpt2jax.flops), every record that has tokens_per_second
  also gets the model's achieved TFLOP/s and, where the devices' peak is known, its MFU.
  """

  def __init__(self, workdir: Path, *, keep_through_step: int | None, enabled: bool = True,
               tensorboard: bool = True, flops_per_token: float | None = None,
               peak_flops: float | None = None):
    self.path = Path(workdir) / METRICS_JSONL
    self.enabled = enabled
    self.flops_per_token = flops_per_token
    self.peak_flops = peak_flops
    self.tensorboard = None
    if enabled:
      self._drop_records_after(keep_through_step)
      if tensorboard:
        self.tensorboard = TensorBoard(workdir, resume_after_step=keep_through_step)

  def _drop_records_after(self, step: int | None) -> None:
    """A resumed run rewrites what came after its checkpoint; a fresh run starts empty."""
    if not self.path.exists():
      return
    kept = []
    if step is not None:
      for line in self.path.read_text(encoding="utf-8").splitlines():
        try:
          if json.loads(line)["step"] <= step:
            kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
          continue  # a line cut short by a crash
    write_atomic(self.path, "".join(kept))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    if self.flops_per_token and "tokens_per_second" in record:
      record = {**record, **utilization(record["tokens_per_second"], self.flops_per_token,
                                        self.peak_flops)}
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
    if self.tensorboard:
      self.tensorboard.scalars(record)

  def write_sample(self, step: int, text: str) -> None:
    """samples.txt, and the TensorBoard text tab."""
    if self.enabled:
      append_sample(self.path.parent, step, text)
      if self.tensorboard:
        self.tensorboard.text("samples", text, step)

  def write_text(self, tag: str, text: str, step: int) -> None:
    """Text for TensorBoard only (the run's config, say)."""
    if self.tensorboard:
      self.tensorboard.text(tag, text, step)

  def close(self) -> None:
    if self.tensorboard:
      self.tensorboard.close()


def read_metrics(workdir: Path) -> list[dict]:
  path = Path(workdir) / METRICS_JSONL
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def append_sample(workdir: Path, step: int, text: str) -> None:
  with open(Path(workdir) / SAMPLES_TXT, "a", encoding="utf-8") as f:
    f.write(f"=== step {step} ===\n{text}\n\n")


# metrics.jsonl key -> TensorBoard tag. Other numeric keys are logged as "other/<key>".
TENSORBOARD_TAGS = {
    "train_loss": "train/loss",
    "eval_train_loss": "train/eval_loss",
    "eval_train_perplexity": "train/perplexity",
    "eval_train_bits_per_byte": "train/bits_per_byte",
    "val_loss": "val/loss",
    "val_perplexity": "val/perplexity",
    "val_bits_per_byte": "val/bits_per_byte",
    "learning_rate": "optim/learning_rate",
    "grad_norm": "optim/grad_norm",
    "tokens_per_second": "speed/tokens_per_second",
    "model_tflops_per_second": "speed/model_tflops_per_second",
    "mfu": "speed/mfu",
    "tokens_seen": "progress/tokens_seen",
    "epoch": "progress/epoch",
    "elapsed_seconds": "progress/elapsed_seconds",
}


class TensorBoard:
  """Event files under <workdir>/tensorboard, for `tensorboard --logdir <workdir>/tensorboard`.

  A fresh run deletes the events of an earlier run in the same workdir (as metrics.jsonl is
  emptied); a resumed run marks the steps after its checkpoint as purged, so that TensorBoard
  shows each step once.
  """

  def __init__(self, workdir: Path, *, resume_after_step: int | None):
    from tensorboardX import SummaryWriter

    logdir = Path(workdir) / TENSORBOARD_DIR
    if resume_after_step is None:
      for old in logdir.glob("events.out.tfevents.*"):
        old.unlink()
    purge_step = None if resume_after_step is None else resume_after_step + 1
    # Event files are named by the second they were opened in; the suffix keeps a session's
    # file apart from (and sorted after) one opened in the same second before it.
    self._writer = SummaryWriter(str(logdir), purge_step=purge_step, flush_secs=30,
                                 filename_suffix=f".from_step_{purge_step or 0:09d}")

  def scalars(self, record: dict) -> None:
    step = record["step"]
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        self._writer.add_scalar(TENSORBOARD_TAGS.get(key, f"other/{key}"), value, step)
    self._writer.flush()  # once per log line: cheap, and nothing is lost if the run dies

  def text(self, tag: str, text: str, step: int) -> None:
    # TensorBoard renders text as Markdown; a fenced block keeps newlines and spacing.
    fenced = text.replace("```", "` ` `")
    self._writer.add_text(tag, f"```\n{fenced}\n```", step)

  def close(self) -> None:
    self._writer.close()


class Interval:
  """Per-step metrics since the last log line: kept on device, read at log and save points.

  A checkpoint carries the steps of an unfinished interval (meta["pending_metrics"]), so a
  run resumed from it logs exactly the numbers the uninterrupted run logs.
  """

  def __init__(self, pending: list[dict] = ()):
    # float32 again, as they came from the device, so that means are computed alike.
    self._host = [{k: np.float32(v) for k, v in m.items()} for m in pending]
    self._device: list[dict] = []
    self.checked = 0  # how many of the steps the non-finite guard has seen
    self.restart_clock()

  def restart_clock(self):
    self.started = time.perf_counter()
    self.timed_steps = 0

  def reset(self):
    self._host, self._device, self.checked = [], [], 0
    self.restart_clock()

  def add(self, step_metrics: dict):
    self._device.append(step_metrics)
    self.timed_steps += 1

  def host(self) -> list[dict]:
    if self._device:
      self._host += jax.device_get(self._device)
      self._device = []
    return self._host

  def pending(self) -> list[dict]:
    """The steps not yet logged, as JSON numbers (float32 values convert exactly)."""
    return [{k: float(v) for k, v in m.items()} for m in self.host()]

  def summary(self, tokens_per_step: int, *, count_skipped: bool = False) -> dict:
    host = self.host()
    applied = [m for m in host if not m["nonfinite"]]
    seconds = time.perf_counter() - self.started
    record = {
        "train_loss": float(np.mean([m["loss"] for m in applied])) if applied else math.nan,
        "grad_norm": float(np.mean([m["grad_norm"] for m in applied])) if applied else math.nan,
        "learning_rate": float(host[-1]["learning_rate"]),
        "tokens_per_second": tokens_per_step * self.timed_steps / max(seconds, 1e-9),
    }
    if count_skipped:
      record["skipped_updates"] = len(host) - len(applied)
    return record


def summarize_run(records: Sequence[dict], *, num_params: int, tokens_per_step: int) -> dict:
  """The numbers that describe a finished run, from its metrics.jsonl records."""
  evals = [r for r in records if "val_loss" in r]
  best = min(evals, key=lambda r: r["val_loss"]) if evals else {}
  final = evals[-1] if evals else {}
  last_step = records[-1]["step"] if records else 0
  summary = {
      "steps": last_step,
      "tokens_seen": last_step * tokens_per_step,
      "num_parameters": num_params,
      "wall_seconds": _wall_seconds(records),
      "mean_tokens_per_second": _mean_tokens_per_second(records, tokens_per_step),
      "final_train_loss": records[-1].get("train_loss") if records else None,
  }
  for prefix, r in (("final", final), ("best", best)):
    summary[f"{prefix}_val_step"] = r.get("step")
    for key in ("val_loss", "val_perplexity", "val_bits_per_byte"):
      summary[f"{prefix}_{key}"] = r.get(key)
  return summary


def _mean_tokens_per_second(records: Sequence[dict], tokens_per_step: int) -> float | None:
  """Tokens trained / seconds spent training, over all logged intervals (each record's
  tokens_per_second covers the steps since the record before it)."""
  tokens = seconds = 0.0
  previous_step = 0
  for r in records:
    if r.get("tokens_per_second"):
      interval_tokens = (r["step"] - previous_step) * tokens_per_step
      tokens += interval_tokens
      seconds += interval_tokens / r["tokens_per_second"]
    previous_step = r["step"]
  return tokens / seconds if seconds else None


def _wall_seconds(records: Sequence[dict]) -> float:
  """Wall time of the run: its last elapsed_seconds (a resumed run counts on from its
  checkpoint), plus that of earlier sessions where elapsed_seconds started again from 0."""
  total = session_end = 0.0
  for r in records:
    elapsed = r.get("elapsed_seconds")
    if elapsed is None:
      continue
    if elapsed < session_end:  # a new session began
      total += session_end
    session_end = elapsed
  return total + session_end


def write_summary(workdir: Path, summary: dict) -> Path:
  return write_atomic(Path(workdir) / SUMMARY_JSON, json.dumps(summary, indent=1) + "\n")


def format_summary(summary: dict) -> str:
  """A few console lines: how far the run went, its validation loss, its speed."""
  speed = summary.get("mean_tokens_per_second")
  lines = [f"run summary: {summary['steps']:,} steps, {summary['tokens_seen']:,} tokens, "
           f"{summary['num_parameters']:,} parameters, {summary['wall_seconds']:,.0f} s"
           + (f", {speed:,.0f} tokens/s" if speed else "")]
  for prefix in ("final", "best"):
    if summary.get(f"{prefix}_val_loss") is not None:
      lines.append(f"  {prefix} val loss {summary[f'{prefix}_val_loss']:.4f} at step "
                   f"{summary[f'{prefix}_val_step']} (perplexity "
                   f"{summary[f'{prefix}_val_perplexity']:.2f}, "
                   f"{summary[f'{prefix}_val_bits_per_byte']:.3f} bits/byte)")
  return "\n".join(lines)


class Console:
  """A progress bar on terminals; plain log lines elsewhere (CI, files)."""

  def __init__(self, *, total: int, initial: int, enabled: bool = True):
    from tqdm import tqdm

    self.enabled = enabled
    self.interactive = enabled and sys.stderr.isatty()
    self._bar = tqdm(total=total, initial=initial, disable=not self.interactive,
                     dynamic_ncols=True, unit="step")

  def print(self, text: str) -> None:
    if self.enabled:
      self._bar.write(text) if self.interactive else print(text, flush=True)

  def step(self, n: int = 1) -> None:
    self._bar.update(n)

  def progress(self, step: int, record: dict) -> None:
    """Shows the latest training numbers: on the bar, or as a line when there is none."""
    if self.interactive:
      self._bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                            tok_s=f"{record['tokens_per_second']:,.0f}", refresh=False)
    elif self.enabled:
      print(f"step {step}: loss {record['train_loss']:.4f}, lr {record['learning_rate']:.2e}, "
            f"{record['tokens_per_second']:,.0f} tokens/s", flush=True)

  def close(self) -> None:
    self._bar.close()
