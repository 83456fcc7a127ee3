"""What a run reports: metrics.jsonl, samples.txt, console lines and a progress bar.

Only process 0 writes; other processes get the same objects with writing turned off.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from gpt2jax.checkpoint import METRICS_JSONL, SAMPLES_TXT

LN2 = math.log(2.0)


def loss_summary(prefix: str, loss: float, bytes_per_token: float) -> dict:
  """Loss in nats per token, perplexity and bits per byte (comparable across tokenizers)."""
  return {
      f"{prefix}_loss": loss,
      f"{prefix}_perplexity": math.exp(min(loss, 80.0)),
      f"{prefix}_bits_per_byte": loss / LN2 / bytes_per_token,
  }


class MetricsLog:
  """Appends one JSON object per line to <workdir>/metrics.jsonl."""

  def __init__(self, workdir: Path, *, keep_through_step: int | None, enabled: bool = True):
    self.path = Path(workdir) / METRICS_JSONL
    self.enabled = enabled
    if enabled:
      self._drop_records_after(keep_through_step)

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
    tmp = self.path.with_name(self.path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(self.path)

  def write(self, record: dict) -> None:
    if self.enabled:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_metrics(workdir: Path) -> list[dict]:
  path = Path(workdir) / METRICS_JSONL
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def append_sample(workdir: Path, step: int, text: str) -> None:
  with open(Path(workdir) / SAMPLES_TXT, "a", encoding="utf-8") as f:
    f.write(f"=== step {step} ===\n{text}\n\n")


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
