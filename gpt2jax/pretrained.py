"""A transformers GPT-2 directory as a gpt2jax model.

Used as it is by `sample.py --init_from=DIR` and `python -m gpt2jax.evaluate --init_from=DIR`
(gpt2jax.runs.load_pretrained reads it with `read_params`), or as the start of a training run with `--config.init_from=DIR`
(`resolve_config` before anything else, `initial_params` instead of a random start). The
directory is what `GPT2LMHeadModel.save_pretrained` and a tokenizer's `save_pretrained` write:
config.json, model.safetensors (or shards) and tokenizer.json; gpt2jax.hf_checkpoint maps the
weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from gpt2jax import hf_checkpoint
from gpt2jax.errors import UserError
from gpt2jax.model import GPT


def resolve_config(config: ml_collections.ConfigDict
                   ) -> tuple[ml_collections.ConfigDict, str | None]:
  """A copy of config for a run that starts from config.init_from, and a note of what changed.

  The checkpoint decides the model's shape (layers, heads, width, biases, tied head,
  vocabulary) and the tokenizer (its tokenizer.json, unless tokenizer.path names another);
  model.block_size may be smaller than the checkpoint's positions (the position embedding is
  cropped), and dropout and everything else stay the config's.
  """
  config = config.copy_and_resolve_references()
  directory = config.get("init_from", "")
  if not directory:
    return config, None
  shape = hf_checkpoint.read_shape(directory)
  changed = []
  fields = {**shape.model_fields(), "vocab_size": shape.vocab_size}
  for key, value in fields.items():
    if config.model[key] != value:
      changed.append(f"model.{key}={value}")
      config.model[key] = value
  if config.model.block_size > shape.n_positions:
    raise UserError(f"model.block_size={config.model.block_size} is longer than the "
                    f"{shape.n_positions} positions of the checkpoint in {directory}: set "
                    f"--config.model.block_size={shape.n_positions} or less.")
  if config.tokenizer.kind != "hf":
    changed.append("tokenizer.kind='hf'")
    config.tokenizer.kind = "hf"
  if not config.tokenizer.path:
    config.tokenizer.path = directory
  note = None
  if changed:
    note = (f"init_from={directory}: the checkpoint sets {', '.join(changed)} (its own shape "
            "and tokenizer)")
  return config, note


def read_params(directory: str | Path, shape: hf_checkpoint.GPT2Shape, model: GPT
                 ) -> dict[str, Any]:
  """The checkpoint's weights as numpy parameters of model, every shape checked."""
  cfg = model.config
  params = hf_checkpoint.to_params(hf_checkpoint.read_tensors(directory), shape,
                                   block_size=cfg.block_size, scan_layers=cfg.scan_layers)
  dummy = jnp.zeros((1, cfg.block_size), jnp.int32)
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy)["params"])
  hf_checkpoint.check_shapes(params, expected, f"The checkpoint in {directory}")
  return params


def initial_params(config: ml_collections.ConfigDict, model: GPT, abstract_params: Any) -> Any:
  """config.init_from's weights placed as abstract_params says (shardings included): every
  process reads the files and keeps the shards its devices hold."""
  shape = hf_checkpoint.read_shape(config.init_from)
  params = read_params(config.init_from, shape, model)
  return jax.tree.map(
      lambda value, target: jax.make_array_from_callback(
          target.shape, target.sharding, lambda index: value[index]),
      params, abstract_params)
