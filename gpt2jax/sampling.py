"""Text generation: prompt prefill, then one-token decoding with a KV cache.

Decoding runs inside one jitted `lax.while_loop` per context window, so the host is not
involved per token. Prompts of different lengths are left-padded and masked, and their padded
length is rounded up to a bucket so that new prompt lengths rarely compile anew. When a
sequence outgrows the model's block, generation continues from the last half block of
context (prefilled again), as nanoGPT crops its context. Loading a trained run to sample from
is gpt2jax.runs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax.errors import UserError
from gpt2jax.model import GPT, KVCache

if TYPE_CHECKING:
  from gpt2jax.runs import LoadedModel


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  max_new_tokens: int = 200
  temperature: float = 1.0  # 0 means greedy
  top_k: int = 0  # 0 means no top-k filter
  top_p: float = 1.0  # 1 means no nucleus filter
  stop_at_eos: bool = True

  def validate(self) -> None:
    if self.max_new_tokens < 1:
      raise UserError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}.")
    if self.temperature < 0:
      raise UserError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}.")
    if self.top_k < 0:
      raise UserError(f"--top_k must be >= 0 (0 turns it off), got {self.top_k}.")
    if not 0.0 < self.top_p <= 1.0:
      raise UserError(f"--top_p must be in (0, 1] (1 turns it off), got {self.top_p}.")


def filter_logits(logits, top_k: int, top_p: float):
  """Keeps the top_k most likely tokens and the smallest set holding top_p of the mass."""
  neg_inf = jnp.finfo(logits.dtype).min
  if top_k:
    kth_largest = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth_largest, neg_inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # The cutoff is the smallest logit whose preceding mass is still below top_p.
    below = jnp.concatenate(
        [jnp.ones_like(cumulative[..., :1], bool), cumulative[..., :-1] < top_p], axis=-1)
    cutoff = jnp.min(jnp.where(below, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg_inf, logits)
  return logits


def sample_token(logits, rng, temperature, top_k: int, top_p: float, num_tokens=None):
  """Next token per row: argmax when temperature == 0, else a filtered categorical draw.

  num_tokens: ids at or above it are never drawn (a model's vocabulary may be padded past the
  tokenizer's).
  """
  if num_tokens is not None:
    vocabulary = jnp.arange(logits.shape[-1]) < num_tokens
    logits = jnp.where(vocabulary, logits, jnp.finfo(logits.dtype).min)
  greedy = jnp.argmax(logits, axis=-1)
  scaled = filter_logits(logits / jnp.maximum(temperature, 1e-6), top_k, top_p)
  drawn = jax.random.categorical(rng, scaled, axis=-1)
  return jnp.where(temperature == 0, greedy, drawn).astype(jnp.int32)


def _prefill(model: GPT, params, tokens, start):
  """Logits after the last of the (left-padded) tokens, and their KV cache."""
  # The empty cache is made outside the jitted function: as a constant inside it, XLA
  # constant-folds the attention over its (all masked) slots, for seconds per layer.
  cache = KVCache.create(model.config, tokens.shape[0], start)
  return _jitted_prefill(model, params, tokens, cache)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _jitted_prefill(model: GPT, params, tokens, cache: KVCache):
  logits, cache = model.apply({"params": params}, tokens, cache=cache)
  return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("model", "top_k", "top_p", "max_steps"))
def _decode(model: GPT, params, cache, last_logits, rng, done, num_steps, temperature,
            eos_id, num_tokens, *, top_k: int, top_p: float, max_steps: int):
  """Draws up to num_steps tokens (<= max_steps, static) or until every row is done."""
  batch = last_logits.shape[0]

  def cond(carry):
    step, _, _, _, done, _ = carry
    return (step < num_steps) & ~jnp.all(done)

  def body(carry):
    step, cache, logits, rng, done, out = carry
    rng, draw_rng = jax.random.split(rng)
    token = sample_token(logits, draw_rng, temperature, top_k, top_p, num_tokens)
    token = jnp.where(done, eos_id, token)
    out = out.at[:, step].set(token)
    done = done | (token == eos_id)
    logits, cache = model.apply({"params": params}, token[:, None], cache=cache)
    return step + 1, cache, logits[:, -1], rng, done, out

  out = jnp.full((batch, max_steps), eos_id, jnp.int32)
  init = (jnp.zeros((), jnp.int32), cache, last_logits, rng, done, out)
  steps, _, _, rng, done, out = jax.lax.while_loop(cond, body, init)
  return out, steps, done, rng


def _left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int):
  tokens = np.full((len(rows), length), pad_id, np.int32)
  start = np.zeros((len(rows),), np.int32)
  for i, row in enumerate(rows):
    row = list(row)[-length:]
    tokens[i, length - len(row):] = row
    start[i] = length - len(row)
  return tokens, start


def _bucket(length: int, block_size: int, limit: int) -> int:
  """Rounds a context length up to 1/16 of the block, so few distinct shapes get compiled."""
  step = max(1, block_size // 16)
  return min(-(-length // step) * step, limit)


def generate(model: GPT, params, prompts: Sequence[Sequence[int]], options: SamplingOptions,
             *, eos_id: int, pad_id: int, seed: int = 0, use_cache: bool = True,
             vocab_size: int | None = None) -> list[list[int]]:
  """New tokens for each prompt (end-of-text not included). Prompts must be non-empty.

  use_cache=False is the reference decoder: every token is drawn from a full forward pass
  over its context (a prefill per token) instead of from the KV cache. It draws the same
  random numbers, so both give the same tokens as long as the context fits the block.
  vocab_size: the tokenizer's, when the model's vocabulary is padded past it (never drawn).
  """
  if any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token (use [eos_id] to start fresh)")
  rng = jax.random.key(seed)
  num_tokens = jnp.int32(vocab_size or model.config.vocab_size)
  block = model.config.block_size
  sequences = [list(p)[-(block - 1):] for p in prompts]
  new_tokens: list[list[int]] = [[] for _ in prompts]
  done = np.zeros((len(prompts),), bool)
  remaining = options.max_new_tokens
  stop_id = eos_id if options.stop_at_eos else -1
  context_len = _bucket(max(len(s) for s in sequences), block, block - 1)
  while remaining > 0 and not done.all():
    # A window: prefill the context, then decode from the cache while it has room (one token
    # without the cache). Every drawn token is fed back, so a window holds at most a block.
    tokens, start = _left_pad(sequences, context_len, pad_id)
    last_logits, cache = _prefill(model, params, jnp.asarray(tokens), jnp.asarray(start))
    steps_here = min(remaining, block - context_len) if use_cache else 1
    out, steps, done_after, rng = _decode(
        model, params, cache, last_logits, rng, jnp.asarray(done), steps_here,
        jnp.float32(options.temperature), stop_id, num_tokens, top_k=options.top_k,
        top_p=options.top_p, max_steps=block,
    )
    out, steps = np.asarray(out), int(steps)
    for i in range(len(prompts)):
      for token in out[i, :steps]:
        if done[i] or token == stop_id:
          break
        new_tokens[i].append(int(token))
        sequences[i].append(int(token))
    done = np.asarray(done_after)
    remaining -= steps
    if use_cache:
      context_len = block // 2  # later windows continue from the last half block
    else:
      context_len = _bucket(max(len(s) for s in sequences), block, block - 1)
  return new_tokens


def complete_prompts(loaded: "LoadedModel", prompts: Sequence[str], options: SamplingOptions,
                     *, num_samples: int = 1, seed: int = 0, use_cache: bool = True,
                     warn: Callable[[str], None] = print) -> list[str]:
  """Prompt + generated text for each prompt, num_samples times each (in one batch)."""
  options.validate()
  if num_samples < 1:
    raise UserError(f"--num_samples must be at least 1, got {num_samples}.")
  if any(not p for p in prompts):
    raise UserError("The prompt is empty: give some text, or leave out --prompt to sample "
                    "from the start of a document.")
  tokenizer, block = loaded.tokenizer, loaded.model.config.block_size
  texts = [loaded.normalize_prompt(p) for p in prompts] or [""]
  rows = []
  for text in texts:
    ids = tokenizer.encode_prompt(text)
    if len(ids) > block - 1:
      warn(f"warning: the prompt is {len(ids)} tokens but the model sees {block - 1}: "
           "it is cropped from the left.")
    rows.extend([ids] * num_samples)
  new = generate(loaded.model, loaded.params, rows, options, eos_id=tokenizer.eos_id,
                 pad_id=tokenizer.pad_id, seed=seed, use_cache=use_cache,
                 vocab_size=tokenizer.vocab_size)
  return [texts[i // num_samples] + tokenizer.decode(tokens) for i, tokens in enumerate(new)]
