"""How well a trained model predicts any text: loss, perplexity, bits per byte and per character.

A text longer than the model's block is scored in sliding windows. The first window scores
all its tokens; each later one moves on by `stride` tokens and scores only the tokens no
window has scored yet, which so see at least block_size - stride tokens of context. Every
token is scored exactly once; stride=1 gives every token the most context the block allows.
The text is one document: it is preceded by end-of-text, as documents were in training.

A file is streamed: read, normalized and encoded a piece at a time (gpt2jax.data.pieces: the
ids are those of the whole text), its windows built as their tokens arrive and scored in
batches, one batch computing while the next is built. Memory is bounded by a piece and a
batch, whatever the size of the file.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from gpt2jax import runtime
from gpt2jax.data import sources
from gpt2jax.errors import UserError
from gpt2jax.metrics import LN2, perplexity

EVALUATE_PIECE_CHARS = 1 << 16  # text encoded at once: small, for a smooth progress bar


@dataclasses.dataclass(frozen=True)
class Window:
  """Inputs seq[start:end] predict seq[start+1:end+1]; targets seq[first_target:end+1] count."""

  start: int
  first_target: int
  end: int


def check_stride(stride: int, block_size: int) -> None:
  if stride < 1 or stride > block_size:
    raise UserError(f"--stride={stride} must be between 1 and the block size {block_size}.")


def sliding_windows(num_targets: int, block_size: int, stride: int) -> list[Window]:
  """Windows over seq[0..num_targets] that score each target seq[1..num_targets] once."""
  check_stride(stride, block_size)
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


def stream_windows(id_chunks: Iterable, block_size: int, stride: int, eos_id: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """(inputs, targets, index of the first scored target) of each window sliding_windows gives
  for end-of-text followed by the ids, built while the ids still arrive (their number is
  known only at the end); only the ids the next window needs are kept."""
  check_stride(stride, block_size)
  held = np.array([eos_id], np.int64)  # held[i] is seq[base + i] of seq = [eos] + ids
  base = scored = 0  # targets seq[1..scored] are in windows already
  end = block_size  # the next window ends here, unless the text ends first

  def window(end: int):
    start = max(0, end - block_size)
    part = held[start - base:end + 1 - base]
    return part[:-1], part[1:], scored - start

  for ids in id_chunks:
    held = np.concatenate([held, np.asarray(ids, np.int64)])
    while base + len(held) - 1 >= end:  # targets up to seq[end] are known
      yield window(end)
      scored, end = end, end + stride
    # The next window starts at end - block_size, or earlier if the text ends first.
    drop = max(0, scored + 1 - block_size) - base
    if drop > 0:
      held, base = held[drop:], base + drop
  total = base + len(held) - 1
  while scored < total:
    yield window(min(end, total))
    scored, end = min(end, total), end + stride


def _batches(windows: Iterator, block_size: int, batch_size: int, pad_id: int) -> Iterator:
  """Windows in rows of fixed-size batches (one compiled shape): (inputs, targets, scored)
  with `scored` marking the positions whose loss counts; padding after a short window
  cannot change it, as attention is causal."""
  while True:
    inputs = np.full((batch_size, block_size), pad_id, np.int32)
    targets = np.zeros((batch_size, block_size), np.int32)
    scored = np.zeros((batch_size, block_size), bool)
    rows = 0
    for inputs_row, targets_row, first in windows:
      inputs[rows, :len(inputs_row)] = inputs_row
      targets[rows, :len(targets_row)] = targets_row
      scored[rows, first:len(targets_row)] = True
      rows += 1
      if rows == batch_size:
        break
    if not rows:
      return
    yield inputs, targets, scored


def scored_nats(model, params, id_chunks: Iterable, *, eos_id: int, pad_id: int, stride: int,
                batch_size: int = 32) -> Iterator[np.ndarray]:
  """The negative log-likelihood (nats) of each id given end-of-text and the ids before it,
  in order, a batch of windows at a time. The next batch is built (its text read and encoded)
  while the model computes one; never two at once, which would double the memory."""
  block = model.config.block_size
  token_losses = _token_losses_fn(model)
  in_flight = None
  for inputs, targets, scored in _batches(stream_windows(id_chunks, block, stride, eos_id),
                                          block, batch_size, pad_id):
    done = None
    if in_flight is not None:
      done = np.asarray(in_flight[0], np.float64)[in_flight[1]]  # waits for it
    in_flight = (token_losses(params, inputs, targets), scored)  # dispatched, runs on
    if done is not None:
      yield done
  if in_flight is not None:
    yield np.asarray(in_flight[0], np.float64)[in_flight[1]]


def token_nats(model, params, ids: list[int], *, eos_id: int, pad_id: int, stride: int,
               batch_size: int = 32) -> np.ndarray:
  """Negative log-likelihood (nats) of each of ids, in order, given end-of-text before them."""
  parts = list(scored_nats(model, params, [ids], eos_id=eos_id, pad_id=pad_id, stride=stride,
                           batch_size=batch_size))
  nats = np.concatenate(parts) if parts else np.zeros((0,), np.float64)
  assert len(nats) == len(ids), "a token was not scored"
  return nats


def check_text_file(path: str | Path) -> Path:
  path = Path(path)
  if not path.is_file():
    raise UserError(f"--text_file {path} does not exist (or is not a file).")
  if path.stat().st_size == 0:
    raise UserError(f"--text_file {path} is empty: give a file with some text to score.")
  return path


def read_text_file(path: str | Path) -> str:
  """A whole text file (small files; score_file streams)."""
  return sources.read_utf8(check_text_file(path))


TRIM_EVERY_SECONDS = 20  # how often scoring hands freed memory back (runtime.release_free_memory)
LOGITS_BUDGET_BYTES = 128 << 20  # float32 logits of one batch of windows, at most


def default_batch_size(model_config) -> int:
  """Windows per forward pass: up to 32, fewer when their logits would pass
  LOGITS_BUDGET_BYTES (GPT-2's 1,024 x 50,257 logits take 206 MB a window: one at a time),
  as the temporaries of a forward pass are a few times its logits."""
  per_window = model_config.block_size * model_config.vocab_size * 4
  return int(min(32, max(1, LOGITS_BUDGET_BYTES // per_window)))


def default_stride(block_size: int) -> int:
  """Half the block: every token sees at least half a block of context and the model reads
  each token twice. A quarter block costs twice that and gave the same loss on the CPU
  recipe's model; a whole block costs half but leaves a window's first tokens little context
  (README, Evaluation)."""
  return max(1, block_size // 2)


def stride_cost(block_size: int, stride: int) -> str:
  """What a stride buys and costs, in a sentence."""
  return (f"windows of {block_size} tokens, stride {stride}: each token is predicted from at "
          f"least {min(block_size - stride, block_size - 1)} tokens of context (all the text "
          f"before it near the start) and read {block_size / stride:.1f}x by the model "
          f"(--stride={block_size}: 1x, less context; --stride=1: {block_size}x, a full block "
          "for every token)")


@dataclasses.dataclass
class _Reading:
  """What streaming a text learned about it besides its tokens."""

  raw_characters: int = 0
  raw_bytes: int = 0
  characters: int = 0  # after normalization
  bytes: int = 0
  tokens: int = 0
  normalized: bool = False  # whether normalization changed anything


def _encoded(loaded, raw_pieces: Iterable[str], reading: _Reading) -> Iterator[list[int]]:
  for raw in raw_pieces:
    text = loaded.normalize_prompt(raw)
    reading.raw_characters += len(raw)
    reading.raw_bytes += len(raw.encode("utf-8"))
    reading.characters += len(text)
    reading.bytes += len(text.encode("utf-8"))
    reading.normalized = reading.normalized or text != raw
    ids = loaded.tokenizer.encode(text) if text else []
    reading.tokens += len(ids)
    yield ids


def _score(loaded, raw_pieces: Iterable[str], *, stride: int, batch_size: int,
           on_progress: Callable[[_Reading, int], None] | None = None
           ) -> tuple[TextScore, _Reading]:
  tokenizer, reading = loaded.tokenizer, _Reading()
  total_nats, scored = 0.0, 0
  trimmed = time.monotonic()
  for nats in scored_nats(loaded.model, loaded.params, _encoded(loaded, raw_pieces, reading),
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, stride=stride,
                          batch_size=batch_size):
    total_nats += float(nats.sum())
    scored += len(nats)
    if time.monotonic() - trimmed > TRIM_EVERY_SECONDS:  # memory bounded whatever the length
      runtime.release_free_memory()
      trimmed = time.monotonic()
    if on_progress:
      on_progress(reading, scored)
  if not reading.characters:
    raise UserError("Nothing is left of the text after normalization (it held only marks the "
                    "training corpus removes): give a text with letters in it.")
  return TextScore(tokens=reading.tokens, characters=reading.characters, bytes=reading.bytes,
                   total_nats=total_nats), reading


def score_text(loaded: Any, text: str, *, stride: int | None = None,
               batch_size: int | None = None) -> tuple[TextScore, str]:
  """The model's score on text (after the corpus's normalization), and the text it scored.

  loaded: a runs.LoadedModel. stride defaults to default_stride(block).
  """
  stride = stride or default_stride(loaded.model.config.block_size)
  normalized = loaded.normalize_prompt(text)
  if not normalized:
    raise UserError("Nothing is left of the text after normalization (it held only marks the "
                    "training corpus removes): give a text with letters in it.")
  pieces = (p.text for p in sources.split_stream([text], "", EVALUATE_PIECE_CHARS))
  score, _ = _score(loaded, pieces, stride=stride,
                    batch_size=batch_size or default_batch_size(loaded.model.config))
  return score, normalized


@dataclasses.dataclass(frozen=True)
class FileScore:
  score: TextScore
  raw_characters: int  # before normalization
  normalized: bool  # whether normalization changed the text
  seconds: float


def score_file(loaded: Any, path: str | Path, *, stride: int | None = None,
               batch_size: int | None = None, progress: bool = True) -> FileScore:
  """The model's score on a UTF-8 file of any size, streamed (see the module docstring), with
  a progress bar on stderr that estimates the time left."""
  from tqdm import tqdm

  path = check_text_file(path)
  stride = stride or default_stride(loaded.model.config.block_size)
  size = path.stat().st_size
  pieces = (p.text for p in sources.split_stream(sources.utf8_chunks(path), "",
                                                  EVALUATE_PIECE_CHARS))
  tty = sys.stderr.isatty()
  start = time.perf_counter()
  with tqdm(total=size, unit="B", unit_scale=True, desc="scoring", disable=not progress,
            mininterval=0.5 if tty else 15, file=sys.stderr) as bar:
    def on_progress(reading: _Reading, scored: int) -> None:
      # The bytes read so far, in the share of their tokens already scored.
      done = int(reading.raw_bytes * scored / max(reading.tokens, 1))
      bar.update(max(done - bar.n, 0))

    score, reading = _score(loaded, pieces, stride=stride,
                            batch_size=batch_size or default_batch_size(loaded.model.config),
                            on_progress=on_progress)
    bar.update(size - bar.n)
  return FileScore(score, reading.raw_characters, reading.normalized,
                   time.perf_counter() - start)
