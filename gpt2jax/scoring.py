"""How well a trained model predicts any text: loss, perplexity, bits per byte and per character.

A text longer than the model's block is scored in sliding windows. The first window scores
all its tokens; each later one moves on by `stride` tokens and scores only the tokens no
window has scored yet, which so see at least block_size - stride tokens of context. Every
token is scored exactly once; stride=1 gives every token the most context the block allows.
The text is one document: it is preceded by end-of-text, as documents were in training.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np

from gpt2jax.data.sources import read_utf8
from gpt2jax.errors import UserError
from gpt2jax.metrics import LN2, perplexity



@dataclasses.dataclass(frozen=True)
class Window:
  """Inputs seq[start:end] predict seq[start+1:end+1]; targets seq[first_target:end+1] count."""

  start: int
  first_target: int
  end: int


def sliding_windows(num_targets: int, block_size: int, stride: int) -> list[Window]:
  """Windows over seq[0..num_targets] that score each target seq[1..num_targets] once."""
  if stride < 1 or stride > block_size:
    raise UserError(f"--stride={stride} must be between 1 and the block size {block_size}.")
  windows, scored = [], 0  # targets seq[1..scored] are done
  end = min(block_size, num_targets)
  while scored < num_targets:
    windows.append(Window(start=max(0, end - block_size), first_target=scored + 1, end=end))
    scored = end
    end = min(end + stride, num_targets)
  return windows


@dataclasses.dataclass(frozen=True)
class TextScore:
  tokens: int
  characters: int
  bytes: int
  total_nats: float  # summed negative log-likelihood of every token

  @property
  def loss(self) -> float:
    """Mean nats per token."""
    return self.total_nats / self.tokens

  @property
  def perplexity(self) -> float:
    return perplexity(self.loss)

  @property
  def bits_per_byte(self) -> float:
    return self.total_nats / LN2 / self.bytes

  @property
  def bits_per_character(self) -> float:
    return self.total_nats / LN2 / self.characters

  def as_dict(self) -> dict:
    return {"loss": self.loss, "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte, "bits_per_character": self.bits_per_character,
            "tokens": self.tokens, "characters": self.characters, "bytes": self.bytes,
            "total_nats": self.total_nats}


@functools.lru_cache(maxsize=None)
def _token_losses_fn(model):
  import jax
  import optax

  @jax.jit
  def token_losses(params, inputs, targets):
    logits, _ = model.apply({"params": params}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [batch, time]

  return token_losses


def token_nats(model, params, ids: list[int], *, eos_id: int, pad_id: int, stride: int,
               batch_size: int = 32) -> np.ndarray:
  """Negative log-likelihood (nats) of each of ids, in order, given end-of-text before them."""
  block = model.config.block_size
  seq = np.asarray([eos_id] + list(ids), np.int64)
  windows = sliding_windows(len(ids), block, stride)
  rows = -(-len(windows) // batch_size) * batch_size  # whole batches: one compiled shape
  inputs = np.full((rows, block), pad_id, np.int32)
  targets = np.zeros((rows, block), np.int32)
  target_index = np.full((rows, block), -1, np.int64)  # which of ids a position scores
  for row, w in enumerate(windows):
    length = w.end - w.start  # padding after it cannot change it: attention is causal
    inputs[row, :length] = seq[w.start:w.end]
    targets[row, :length] = seq[w.start + 1:w.end + 1]
    first = w.first_target - w.start - 1
    target_index[row, first:length] = np.arange(w.first_target, w.end + 1) - 1
  token_losses = _token_losses_fn(model)
  nats = np.full((len(ids),), np.nan, np.float64)
  for lo in range(0, rows, batch_size):
    losses = np.asarray(token_losses(params, inputs[lo:lo + batch_size],
                                     targets[lo:lo + batch_size]))
    scored = target_index[lo:lo + batch_size] >= 0
    nats[target_index[lo:lo + batch_size][scored]] = losses[scored]
  assert not np.isnan(nats).any(), "a token was not scored"
  return nats


def read_text_file(path: str | Path) -> str:
  path = Path(path)
  if not path.is_file():
    raise UserError(f"--text_file {path} does not exist (or is not a file).")
  text = read_utf8(path)
  if not text:
    raise UserError(f"--text_file {path} is empty: give a file with some text to score.")
  return text


def default_stride(block_size: int) -> int:
  """A quarter of the block: every token sees at least 3/4 of a block of context."""
  return max(1, block_size // 4)


def score_text(loaded: Any, text: str, *, stride: int | None = None, batch_size: int = 32
               ) -> tuple[TextScore, str]:
  """The model's score on text (after the corpus's normalization), and the text it scored.

  loaded: a runs.LoadedModel. stride defaults to default_stride(block).
  """
  block = loaded.model.config.block_size
  stride = stride or default_stride(block)
  normalized = loaded.normalize_prompt(text)
  if not normalized:
    raise UserError("Nothing is left of the text after normalization (it held only marks the "
                    "training corpus removes): give a text with letters in it.")
  tokenizer = loaded.tokenizer
  ids = tokenizer.encode(normalized)
  nats = token_nats(loaded.model, loaded.params, ids, eos_id=tokenizer.eos_id,
                    pad_id=tokenizer.pad_id, stride=stride, batch_size=batch_size)
  score = TextScore(tokens=len(ids), characters=len(normalized),
                    bytes=len(normalized.encode("utf-8")), total_nats=float(nats.sum()))
  return score, normalized
