"""A trained run, loaded for inference: what sample.py, evaluate, scoring, plots and export
share.

`load_model(workdir, step)` reads a workdir (config.json, tokenizer, the parameters of one
checkpoint); `load_pretrained(directory)` reads a transformers GPT-2 directory instead;
`load_requested` picks between them from an entry point's flags, and `find_latest_run` is the
default workdir. Each gives a LoadedModel.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gpt2jax import hf_checkpoint, pretrained
from gpt2jax.checkpoint import Checkpoints
from gpt2jax.data.normalize import normalize_text, strip_hebrew_marks, strips_hebrew_marks
from gpt2jax.errors import UserError
from gpt2jax.hf_tokenizer import HFTokenizer
from gpt2jax.model import GPT, GPTConfig
from gpt2jax.tokenizer import load_tokenizer, model_vocab_size
from gpt2jax.workdir import CHECKPOINT_DIR, CONFIG_JSON, TOKENIZER_DIR, load_config


@dataclasses.dataclass
class LoadedModel:
  """A trained run (or a transformers GPT-2, see load_pretrained) ready for inference."""

  workdir: Path  # the run's workdir, or the transformers directory
  config: Any  # the run's ml_collections config
  model: GPT
  params: Any
  tokenizer: Any
  step: int
  from_workdir: bool = True  # False: a transformers GPT-2, whose text is taken as it is

  @property
  def name(self) -> str:
    """How messages name the model."""
    return f"{self.workdir} ({self._what})"

  @property
  def short_name(self) -> str:
    return f"{self.workdir.name} ({self._what})"

  @property
  def _what(self) -> str:
    return f"step {self.step}" if self.from_workdir else "transformers GPT-2"

  def normalize_prompt(self, text: str) -> str:
    """The corpus's normalization, so prompts look like the training text."""
    if not self.from_workdir:
      return text
    text = normalize_text(text)
    if strips_hebrew_marks(self.config.data):
      text = strip_hebrew_marks(text)
    return text


def find_latest_run(runs_dir: str | Path = "runs") -> Path:
  """The workdir under runs_dir whose newest checkpoint is the most recent."""
  candidates = []
  for config_file in Path(runs_dir).glob(f"*/{CONFIG_JSON}"):
    checkpoint_dir = config_file.parent / CHECKPOINT_DIR
    stamps = [p.stat().st_mtime for p in checkpoint_dir.glob("[0-9]*")]
    if stamps:
      candidates.append((max(stamps), config_file.parent))
  if not candidates:
    raise UserError(f"No trained run under {runs_dir}/: train one with "
                    "`python train.py --config=configs/<recipe>.py`, or pass --workdir.")
  return max(candidates)[1]


def load_model(workdir: str | Path, step: int | None = None) -> LoadedModel:
  """Loads config, tokenizer and the parameters of checkpoint `step` (default: latest)."""
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise UserError(f"--workdir {workdir} does not exist.")
  config = load_config(workdir)
  tokenizer = load_tokenizer(workdir / TOKENIZER_DIR)
  model = GPT(GPTConfig.from_config(config.model, model_vocab_size(tokenizer, config.model)))
  checkpoints = Checkpoints(workdir, async_save=False, for_training=False)
  if step is None:
    step = checkpoints.latest_step()
    if step is None:
      raise UserError(f"{workdir} holds no checkpoint yet: train it first, or let a running "
                      f"training reach train.checkpoint_every steps.")
  dummy = jnp.zeros((1, model.config.block_size), jnp.int32)
  abstract_params = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy)["params"])
  params = checkpoints.restore_params(step, abstract_params)
  return LoadedModel(workdir, config, model, params, tokenizer, step)


def load_requested(workdir: str | None, step: int | None = None, init_from: str | None = None,
                   *, doing: str = "using") -> LoadedModel:
  """The model an entry point's flags name: --init_from (a transformers GPT-2 directory, as
  it is), or --workdir at --step (default: the most recently trained run, said on stderr)."""
  if init_from:
    if workdir or step is not None:
      raise UserError("--init_from loads a transformers GPT-2 directory instead of a run: "
                      "leave out --workdir and --step.")
    return load_pretrained(init_from)
  if workdir is None:
    workdir = find_latest_run()
    print(f"{doing} {workdir} (the most recently trained run)", file=sys.stderr)
  return load_model(workdir, step)


def load_pretrained(directory: str | Path):
  """A LoadedModel of the transformers GPT-2 in directory (its own tokenizer.json)."""
  directory = Path(directory)
  shape = hf_checkpoint.read_shape(directory)
  tokenizer = HFTokenizer.from_path(directory)
  if tokenizer.vocab_size > shape.vocab_size:
    raise UserError(f"{directory}: the tokenizer has {tokenizer.vocab_size:,} tokens but the "
                    f"model only {shape.vocab_size:,}: they do not belong together.")
  model_config = GPTConfig(vocab_size=shape.vocab_size, block_size=shape.n_positions,
                           **shape.model_fields())
  model = GPT(model_config)
  params = pretrained.read_params(directory, shape, model)
  params = jax.device_put(jax.tree.map(np.asarray, params))
  config = ml_collections.ConfigDict({
      "init_from": str(directory),
      "model": {**shape.model_fields(), "vocab_size": shape.vocab_size,
                "block_size": shape.n_positions, "dropout": 0.0},
      "tokenizer": {"kind": "hf", "path": str(directory), "eos_token": tokenizer.eos_token},
      "data": {"corpus": "", "keep_niqqud": True},
  })
  return LoadedModel(directory, config, model, params, tokenizer, step=0, from_workdir=False)
