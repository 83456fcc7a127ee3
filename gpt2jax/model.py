"""GPT-2 in flax.linen: token and position embeddings, pre-LayerNorm blocks of causal
self-attention and an MLP, a final LayerNorm, a language-model head tied to the token embedding.

One forward pass serves training, prompt prefill and one-token decoding: decoding passes an
explicit `KVCache` pytree and gets the updated cache back, so N new tokens cost N one-token
forwards. This module says what GPT-2 computes; how each part runs fast on each platform
(matmul layouts, dropout bits, the attention path, the cache's write order) is gpt2jax.kernels'.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2jax import kernels, runtime
from gpt2jax.errors import UserError
from gpt2jax.parallel import constrain_to_batch_axes

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Shape and numerics of a GPT-2 model."""

  vocab_size: int
  block_size: int = 256
  n_layer: int = 6
  n_head: int = 6
  n_embd: int = 384
  dropout: float = 0.0
  bias: bool = True
  tie_embeddings: bool = True
  dtype: str = "float32"  # the matmuls' operand dtype; parameters, activations are float32
  remat: bool = False
  scan_layers: bool = False

  def __post_init__(self):
    if self.n_embd % self.n_head:
      raise UserError(
          f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
          "choose n_embd as a multiple of n_head (e.g. 64 per head)."
      )
    if self.dtype not in DTYPES:
      raise UserError(f"model.dtype={self.dtype!r} is not one of {sorted(DTYPES)}, or 'auto' "
                      "(bfloat16 where the hardware multiplies it fast, else float32).")
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
      if getattr(self, name) < 1:
        raise UserError(f"model.{name} must be at least 1, got {getattr(self, name)}.")
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}.")

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @classmethod
  def from_config(cls, model_config, vocab_size: int) -> "GPTConfig":
    """Builds the model shape from `config.model` and the tokenizer's vocabulary size."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"vocab_size"}
    values = {k: v for k, v in model_config.items() if k in fields}
    if values.get("dtype") == "auto":  # bfloat16 where the hardware multiplies it fast
      values["dtype"] = runtime.fast_compute_dtype()
    return cls(vocab_size=vocab_size, **values)


def _init(std: float):
  return nn.initializers.normal(stddev=std)


def _residual_init(cfg: GPTConfig):  # GPT-2's: 1/sqrt(number of residual additions)
  return _init(0.02 / math.sqrt(2 * cfg.n_layer))


class CausalSelfAttention(nn.Module):
  """Multi-head attention in which each token sees itself and the tokens before it.

  With a KV cache (`layer_cache` = this layer's (keys, values)), the new tokens also see the
  cache's earlier slots, and their keys and values are then written into it.
  """

  config: GPTConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, layer_cache, mask, cache_index):
    cfg = self.config
    batch, time, _ = x.shape
    qkv = kernels.Dense(3 * cfg.n_embd, cfg.bias, cfg.compute_dtype, _init(0.02),
                        name="c_attn")(x).astype(cfg.compute_dtype)  # q, k, v feed matmuls
    # Split before moving the heads out, so that the gradient joins dq, dk, dv in one
    # concatenation (unpacking a [3, ...] array would pad and add them).
    q, k, v = (t.reshape(batch, time, cfg.n_head, cfg.head_dim).transpose(0, 2, 1, 3)
               for t in jnp.split(qkv, 3, axis=-1))  # each [batch, heads, time, head_dim]
    if layer_cache is None:
      record = self.is_mutable_collection("intermediates")  # attention maps (plots.py)
      y, weights = kernels.attention(q, k, v, dropout_rate=cfg.dropout,
                                     deterministic=self.deterministic, return_weights=record)
      if record:
        self.sow("intermediates", "attention_weights", weights)
      new_cache = None
    else:
      earlier_mask, new_mask = mask
      y, _ = kernels.attention(q, k, v, past=(*layer_cache, earlier_mask), mask=new_mask)
      new_cache = kernels.cache_update(layer_cache, k, v, cache_index, after=y)
    # The heads concatenated, projected back to [batch, time, n_embd].
    y = kernels.HeadsDense(cfg.n_embd, cfg.bias, cfg.compute_dtype, _residual_init(cfg),
                           name="c_proj")(y)
    y = kernels.Dropout(cfg.dropout)(y, deterministic=self.deterministic)
    return y, new_cache


class MLP(nn.Module):
  config: GPTConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    x = kernels.Dense(4 * cfg.n_embd, cfg.bias, cfg.compute_dtype, _init(0.02),
                      name="c_fc")(x)
    x = nn.gelu(x, approximate=True)
    x = kernels.Dense(cfg.n_embd, cfg.bias, cfg.compute_dtype, _residual_init(cfg),
                      name="c_proj")(x)
    return kernels.Dropout(cfg.dropout)(x, deterministic=self.deterministic)


def _layer_norm(cfg: GPTConfig, name: str) -> nn.LayerNorm:
  # Flax computes LayerNorm statistics in float32 whatever the compute dtype.
  return nn.LayerNorm(epsilon=1e-5, use_bias=cfg.bias, dtype=cfg.compute_dtype, name=name)


class Block(nn.Module):
  """Pre-LayerNorm transformer block. Signature fits nn.scan: (carry, scanned, broadcast...)."""

  config: GPTConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, layer_cache, mask, cache_index):
    cfg = self.config
    x = constrain_to_batch_axes(x)  # [batch, time, n_embd] split by rows under FSDP too
    y, new_cache = CausalSelfAttention(cfg, self.deterministic, name="attn")(
        _layer_norm(cfg, "ln_1")(x), layer_cache, mask, cache_index
    )
    x = x + y
    x = x + MLP(cfg, self.deterministic, name="mlp")(_layer_norm(cfg, "ln_2")(x))
    return x, new_cache


class GPT(nn.Module):
  """GPT-2 language model returning float32 logits [batch, time, vocab] (and the new cache)."""

  config: GPTConfig

  @nn.compact
  def __call__(self, tokens, *, deterministic: bool = True, cache: KVCache | None = None):
    cfg = self.config
    batch, time = tokens.shape
    if cache is None:
      positions = jnp.arange(time)[None, :]  # [1, time]
      mask = cache_index = None
    else:
      positions, mask = _cached_positions_and_masks(cache, time)  # (earlier, new)
      cache_index = cache.index

    wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=_init(0.02), name="wte")
    wpe = nn.Embed(cfg.block_size, cfg.n_embd, embedding_init=_init(0.02), name="wpe")
    x = wte(tokens) + wpe(positions)
    x = kernels.Dropout(cfg.dropout)(x, deterministic=deterministic)

    layers_cache = None if cache is None else (cache.k, cache.v)
    x, new_layers_cache = self._blocks(x, layers_cache, mask, cache_index, deterministic)

    x = _layer_norm(cfg, "ln_f")(x)
    if cfg.tie_embeddings:
      with jax.named_scope("lm_head"):
        logits = kernels.tied_logits(x, wte.embedding, cfg.compute_dtype)
    else:
      logits = kernels.Dense(cfg.vocab_size, False, cfg.compute_dtype, _init(0.02),
                             name="lm_head")(x)
    if cache is None:
      return logits, None
    new_k, new_v = new_layers_cache
    return logits, cache.replace(k=new_k, v=new_v, index=cache.index + time)

  def _blocks(self, x, layers_cache, mask, cache_index, deterministic):
    cfg = self.config
    block_cls = Block
    if cfg.remat:
      block_cls = nn.remat(Block, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(
          block_cls,
          variable_axes={"params": 0, "intermediates": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(0, nn.broadcast, nn.broadcast),
          length=cfg.n_layer,
      )(cfg, deterministic, name="h")
      return stack(x, layers_cache, mask, cache_index)
    new_caches = []  # per layer (k, v)
    for i in range(cfg.n_layer):
      layer_cache = None if layers_cache is None else (layers_cache[0][i], layers_cache[1][i])
      x, new_layer_cache = block_cls(cfg, deterministic, name=f"h_{i}")(
          x, layer_cache, mask, cache_index)
      new_caches.append(new_layer_cache)
    if layers_cache is None:
      return x, None
    return x, tuple(zip(*new_caches))  # (k of every layer, v of every layer)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for the slots decoded so far.

  All rows advance together: slot `index` is written next. Prompts of different lengths are
  left-padded; `start[b]` is the first real slot of row b, and slots before it are masked out.
  """

  # Per layer [batch, heads, max_len, head_dim]: a tuple of one array per layer, or one array
  # stacked on a leading layer axis when the layers are scanned (config.scan_layers).
  # Separate arrays let a decoding step update and read each layer in place.
  k: Any
  v: Any
  index: jax.Array  # [] int32
  start: jax.Array  # [batch] int32

  @classmethod
  def create(cls, config: GPTConfig, batch_size: int, start=None) -> "KVCache":
    shape = (batch_size, config.n_head, config.block_size, config.head_dim)
    if start is None:
      start = jnp.zeros((batch_size,), jnp.int32)

    def zeros():
      if config.scan_layers:
        return jnp.zeros((config.n_layer, *shape), config.compute_dtype)
      return tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.n_layer))

    return cls(k=zeros(), v=zeros(), index=jnp.zeros((), jnp.int32),
               start=jnp.asarray(start, jnp.int32))


def _cached_positions_and_masks(cache: KVCache, time: int):
  """Positions of the new tokens, and which keys each may attend to: (the cache's earlier
  slots [batch, 1, 1, max_len], the new tokens [batch, 1, time, time])."""
  max_len = cache.k[0].shape[-2]
  query_slots = cache.index + jnp.arange(time)  # [time]
  positions = jnp.maximum(query_slots[None, :] - cache.start[:, None], 0)  # [batch, time]
  key_slots = jnp.arange(max_len)
  earlier = (key_slots[None, :] < cache.index) & (key_slots[None, :] >= cache.start[:, None])
  causal = jnp.tril(jnp.ones((time, time), jnp.bool_))
  real = query_slots[None, :] >= cache.start[:, None]  # [batch, time]: not left padding
  new = causal[None, None] & real[:, None, None, :]
  return positions, (earlier[:, None, None, :], new)


def count_params(params: Any, *, non_embedding: bool = False) -> int:
  """Number of parameters; non_embedding leaves out the position embedding (as nanoGPT)."""
  total = sum(x.size for x in jax.tree_util.tree_leaves(params))
  if non_embedding:
    total -= params["wpe"]["embedding"].size
  return total
