"""GPT-2 in flax.linen.

One forward pass serves training (full causal attention over the block), prompt prefill and
one-token decoding: decoding passes an explicit `KVCache` pytree and gets the updated cache
back, so generating N tokens costs N single-token forwards instead of N full ones.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2jax.errors import UserError
from gpt2jax.kernels import causal_attention, linear
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
  dtype: str = "float32"  # compute dtype; parameters are always float32
  remat: bool = False
  scan_layers: bool = False

  def __post_init__(self):
    if self.n_embd % self.n_head:
      raise UserError(
          f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
          "choose n_embd as a multiple of n_head (e.g. 64 per head)."
      )
    if self.dtype not in DTYPES:
      raise UserError(f"model.dtype={self.dtype!r} is not one of {sorted(DTYPES)}.")
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
    return cls(vocab_size=vocab_size, **{k: v for k, v in model_config.items() if k in fields})


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

    return cls(
        k=zeros(),
        v=zeros(),
        index=jnp.zeros((), jnp.int32),
        start=jnp.asarray(start, jnp.int32),
    )


def _dense_init(std: float):
  return nn.initializers.normal(stddev=std)


class Linear(nn.Module):
  """nn.Dense's parameters (kernel [d_in, features], bias) with a CPU-friendly gradient."""

  features: int
  use_bias: bool
  dtype: Any
  kernel_init: Any

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    y = linear(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def attention_weights(q, key_segments, masks):
  """Softmax attention weights (float32) over the keys of all segments, concatenated.

  q: [batch, heads, q_time, head_dim]; each segment's keys [batch, heads, k_time, head_dim]
  with its mask [batch, 1, q_time, k_time] (bool, broadcastable). Returns
  [batch, heads, q_time, total k_time].
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  scores = [jnp.where(mask, jnp.einsum("bhqd,bhkd->bhqk", q, k,
                                       preferred_element_type=jnp.float32) * scale,
                      jnp.finfo(jnp.float32).min)
            for k, mask in zip(key_segments, masks)]
  return jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)


def weighted_values(weights, value_segments):
  """sum over segments of weights[..., segment's keys] @ values: [batch, heads, q_time, d]."""
  out, first = 0, 0
  for v in value_segments:
    w = weights[..., first:first + v.shape[2]]
    out = out + jnp.einsum("bhqk,bhkd->bhqd", w.astype(v.dtype), v)
    first += v.shape[2]
  return out


def split_heads(qkv, n_head: int):
  """[batch, time, 3 * n_embd] -> q, k, v, each [batch, heads, time, head_dim]."""
  batch, time, width = qkv.shape
  qkv = qkv.reshape(batch, time, 3, n_head, width // (3 * n_head))
  return qkv.transpose(2, 0, 3, 1, 4)


class HeadsMerge(nn.Module):
  """The output projection from [batch, heads, time, head_dim] to [batch, time, n_embd].

  Parameters as a Dense(n_embd): kernel [n_embd, n_embd] (rows ordered head-major), bias.
  """

  config: GPTConfig

  @nn.compact
  def __call__(self, y):
    cfg = self.config
    d, h, hd = cfg.n_embd, cfg.n_head, cfg.head_dim
    kernel = self.param("kernel", _dense_init(0.02 / math.sqrt(2 * cfg.n_layer)), (d, d),
                        jnp.float32)
    out = jnp.einsum("bhtk,hkd->btd", y.astype(cfg.compute_dtype),
                     kernel.astype(cfg.compute_dtype).reshape(h, hd, d))
    if cfg.bias:
      out = out + self.param("bias", nn.initializers.zeros_init(), (d,),
                             jnp.float32).astype(cfg.compute_dtype)
    return out


def _index_after(cache_index, value):
  """cache_index, computed from `value` so that XLA must finish `value` first.

  Decoding reads each layer's cache and then updates it in place. Without a data dependency
  XLA cannot order the read before the write, and on CPU it then copies every layer's whole
  cache for each decoded token (over a quarter of its time at batch 1). min(i, i + isnan(x))
  is always i, but XLA does not simplify it away.
  """
  not_a_number = jnp.isnan(value.reshape(-1)[0]).astype(cache_index.dtype)
  return jnp.minimum(cache_index, cache_index + not_a_number)


def _write_cache(layer_cache, k, v, cache_index):
  """This layer's (k, v) cache, each [batch, heads, max_len, head_dim], with the new keys and
  values written from slot cache_index on."""
  write = lambda cache, new: jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype),
                                                          (0, 0, cache_index, 0))
  return write(layer_cache[0], k), write(layer_cache[1], v)


class Dropout(nn.Module):
  """Inverted dropout that draws 8 random bits per element instead of 32.

  One 32-bit threefry draw serves four elements, so the mask costs a quarter of flax's
  nn.Dropout to generate: on a CPU, dropout 0.2 made a step of the shakespeare_char model 46%
  slower with nn.Dropout and 11% slower with this. The keep probability is rounded to a
  multiple of 1/256 (0.8 -> 205/256; rates below 1/512 drop nothing) and the kept values are
  scaled by that rounded probability, so the expected output is still exactly the input.
  """

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    threshold = round((1.0 - self.rate) * 256)  # a byte below it keeps its element
    if deterministic or threshold >= 256:
      return x
    *lead, last = x.shape
    if last % 4:
      return nn.Dropout(self.rate)(x, deterministic=False)
    # Bits shaped like x (last axis / 4) keep x's sharding; each word splits into 4 bytes.
    words = jax.random.bits(self.make_rng("dropout"), (*lead, last // 4), jnp.uint32)
    keep = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(x.shape) < threshold
    return jnp.where(keep, x / jnp.asarray(threshold / 256, x.dtype), jnp.zeros_like(x))


class CausalSelfAttention(nn.Module):
  config: GPTConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, layer_cache, mask, cache_index):
    cfg = self.config
    batch, time, _ = x.shape
    qkv = Linear(3 * cfg.n_embd, cfg.bias, cfg.compute_dtype, _dense_init(0.02),
                 name="c_attn")(x)
    q, k, v = split_heads(qkv, cfg.n_head)  # each [batch, heads, time, head_dim]

    attn_dropout = cfg.dropout > 0.0 and not self.deterministic
    new_cache = None
    if layer_cache is not None:
      # Attends to the cache's earlier slots and to the new keys as two segments, and only
      # then writes the new keys into the cache (see _index_after).
      earlier_mask, new_mask = mask
      weights = attention_weights(q, (layer_cache[0], k), (earlier_mask, new_mask))
      y = weighted_values(weights, (layer_cache[1], v))
      new_cache = _write_cache(layer_cache, k, v, _index_after(cache_index, y))
    elif attn_dropout or self.is_mutable_collection("intermediates"):
      weights = attention_weights(q, (k,), (jnp.tril(jnp.ones((time, time), jnp.bool_)),))
      self.sow("intermediates", "attention_weights", weights)  # attention maps (plots.py)
      weights = Dropout(cfg.dropout)(weights, deterministic=not attn_dropout)
      y = weighted_values(weights, (v,))
    else:
      y = causal_attention(q, k, v)
    y = HeadsMerge(cfg, name="c_proj")(y)
    y = Dropout(cfg.dropout)(y, deterministic=self.deterministic)
    return y, new_cache


class MLP(nn.Module):
  config: GPTConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    x = Linear(4 * cfg.n_embd, cfg.bias, cfg.compute_dtype, _dense_init(0.02), name="c_fc")(x)
    x = nn.gelu(x, approximate=True)
    x = Linear(cfg.n_embd, cfg.bias, cfg.compute_dtype,
               _dense_init(0.02 / math.sqrt(2 * cfg.n_layer)), name="c_proj")(x)
    return Dropout(cfg.dropout)(x, deterministic=self.deterministic)


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

    wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=cfg.compute_dtype,
                   embedding_init=_dense_init(0.02), name="wte")
    wpe = nn.Embed(cfg.block_size, cfg.n_embd, dtype=cfg.compute_dtype,
                   embedding_init=_dense_init(0.02), name="wpe")
    x = wte(tokens) + wpe(positions)
    x = Dropout(cfg.dropout)(x, deterministic=deterministic)

    layers_cache = None if cache is None else (cache.k, cache.v)
    x, new_layers_cache = self._blocks(x, layers_cache, mask, cache_index, deterministic)

    x = _layer_norm(cfg, "ln_f")(x)
    if cfg.tie_embeddings:
      logits = wte.attend(x)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                        kernel_init=_dense_init(0.02), name="lm_head")(x)
    logits = logits.astype(jnp.float32)
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
    new_k, new_v = [], []
    for i in range(cfg.n_layer):
      layer_cache = None if layers_cache is None else (layers_cache[0][i], layers_cache[1][i])
      x, new_layer_cache = block_cls(cfg, deterministic, name=f"h_{i}")(
          x, layer_cache, mask, cache_index
      )
      if new_layer_cache is not None:
        new_k.append(new_layer_cache[0])
        new_v.append(new_layer_cache[1])
    if layers_cache is None:
      return x, None
    return x, (tuple(new_k), tuple(new_v))


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
