"""Deterministic, resumable batches of token windows.

The training split is cut into windows of block_size+1 tokens (inputs and shifted targets).
Each epoch visits every window once, in an order and with a start offset drawn from
(seed, epoch); step s takes global samples [s*B, (s+1)*B) of that endless sequence. So the
batch of a step is a pure function of (seed, step): a resumed run sees exactly the batches an
uninterrupted run would have, and each process of a multi-host run reads only its own rows.
"""

from __future__ import annotations

import numpy as np

from gpt2jax import errors


def _check_length(tokens: np.ndarray, block_size: int, split_name: str) -> None:
  if len(tokens) < block_size + 1:
    raise errors.UserError(
        f"The {split_name} split has {len(tokens)} tokens, fewer than block_size+1 = "
        f"{block_size + 1}: use a larger corpus, a smaller --config.model.block_size"
        + (" or a larger --config.data.val_fraction." if split_name == "validation" else ".")
    )


class TrainBatches:
  """batch(step) -> int32 [local_batch, block_size + 1] for this process.

  batch_size must divide by process_count (steps.validate_config checks it for a run).
  """

  def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    _check_length(tokens, block_size, "training")
    self.tokens = tokens
    self.block_size = block_size
    self.batch_size = batch_size
    self.seed = seed
    self.local_batch_size = batch_size // process_count
    self.local_offset = process_index * self.local_batch_size
    self.windows_per_epoch = (len(tokens) - 1) // block_size
    self._slack = (len(tokens) - 1) - self.windows_per_epoch * block_size
    self._epoch_cache: dict[int, tuple[int, np.ndarray]] = {}

  def _epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
    """(start offset, permutation of window indices) for an epoch."""
    if epoch not in self._epoch_cache:
      rng = np.random.default_rng([self.seed, epoch])
      offset = int(rng.integers(0, self._slack + 1))
      order = rng.permutation(self.windows_per_epoch)
      if len(self._epoch_cache) > 2:
        self._epoch_cache.pop(min(self._epoch_cache))
      self._epoch_cache[epoch] = (offset, order)
    return self._epoch_cache[epoch]

  def window_starts(self, step: int) -> np.ndarray:
    first = step * self.batch_size + self.local_offset
    starts = np.empty((self.local_batch_size,), np.int64)
    for i, sample in enumerate(range(first, first + self.local_batch_size)):
      epoch, position = divmod(sample, self.windows_per_epoch)
      offset, order = self._epoch_order(epoch)
      starts[i] = offset + order[position] * self.block_size
    return starts

  def batch(self, step: int) -> np.ndarray:
    return gather_windows(self.tokens, self.window_starts(step), self.block_size + 1)

  def epoch(self, step: int) -> float:
    return step * self.batch_size / self.windows_per_epoch


def gather_windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
  index = starts[:, None] + np.arange(length)[None, :]  # [batch, length]
  return np.asarray(tokens[index], dtype=np.int32)


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
  """The same fixed windows at every evaluation, spread evenly over the split."""
  _check_length(tokens, block_size, "validation")
  num_windows = num_batches * batch_size
  last_start = len(tokens) - (block_size + 1)
  starts = np.linspace(0, last_start, num_windows).round().astype(np.int64)
  starts = starts.reshape(num_batches, batch_size)
  local = batch_size // process_count
  starts = starts[:, process_index * local:(process_index + 1) * local]
  return [gather_windows(tokens, s, block_size + 1) for s in starts]
