"""transformers' GPT-2 checkpoint files <-> gpt2jax parameters.

A directory written by `GPT2LMHeadModel.save_pretrained` holds config.json and the weights as
safetensors (model.safetensors, or shards listed in model.safetensors.index.json). GPT-2's
layers map one to one onto gpt2jax's:

  transformer.wte.weight [vocab, d]         wte/embedding
  transformer.wpe.weight [positions, d]     wpe/embedding (cropped to model.block_size)
  transformer.h.{i}.ln_1.{weight,bias}      h_{i}/ln_1/{scale,bias}   (and ln_2, ln_f alike)
  transformer.h.{i}.attn.c_attn.weight      h_{i}/attn/c_attn/kernel [d, 3d]: q, k, v, each
                                            split into heads in order, as gpt2jax splits them
  transformer.h.{i}.attn.c_proj.weight      h_{i}/attn/c_proj/kernel [d, d]
  transformer.h.{i}.mlp.c_fc / c_proj       h_{i}/mlp/c_fc / c_proj
  lm_head.weight [vocab, d]                 only when the head is not tied: lm_head/kernel.T

transformers' Conv1D stores its weight as [in, out], a flax Dense kernel's layout, so no
matrix is transposed. GPT-2's "gelu_new" is the tanh approximation gpt2jax uses, and its
LayerNorm epsilon is gpt2jax's 1e-5; checkpoints that differ in such a way are refused rather
than loaded into a model that would compute something else. Only safetensors are read: a
pickle (pytorch_model.bin) is never opened.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from gpt2jax.errors import UserError

CONFIG_JSON = "config.json"
GENERATION_CONFIG_JSON = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Weight files gpt2jax never opens: pickles, and other frameworks' formats.
_REFUSED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
                    "flax_model.msgpack", "model.ckpt.index")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
LAYER_NORM_EPSILON = 1e-5
# Buffers some transformers versions saved beside the weights (the causal mask); not weights.
_BUFFER = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")


@dataclasses.dataclass(frozen=True)
class GPT2Shape:
  """What a transformers GPT-2 config.json says about the model's shape."""

  vocab_size: int
  n_positions: int
  n_embd: int
  n_layer: int
  n_head: int
  tie_embeddings: bool

  def model_fields(self) -> dict:
    """GPTConfig fields (but vocab_size and block_size, which the caller decides)."""
    return {"n_layer": self.n_layer, "n_head": self.n_head, "n_embd": self.n_embd,
            "bias": True, "tie_embeddings": self.tie_embeddings}


def _read_json(path: Path) -> dict:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise UserError(f"{path} cannot be read as JSON ({e}).") from e


def read_shape(directory: str | Path) -> GPT2Shape:
  """The model shape from config.json; refuses what gpt2jax's GPT-2 would compute differently."""
  directory = Path(directory)
  if not directory.is_dir():
    raise UserError(f"{directory} is not a directory: point init_from at a directory written by "
                    "transformers' save_pretrained (config.json + model.safetensors).")
  path = directory / CONFIG_JSON
  if not path.is_file():
    raise UserError(f"{directory} holds no {CONFIG_JSON}: it is not a transformers model "
                    "directory (save one with model.save_pretrained(DIR)).")
  config = _read_json(path)
  model_type = config.get("model_type")
  if model_type != "gpt2":
    raise UserError(f"{path} describes a {model_type!r} model; gpt2jax loads GPT-2 checkpoints "
                    "only (model_type 'gpt2', GPT2LMHeadModel).")
  n_embd = config.get("n_embd", 768)
  problems = []
  if config.get("activation_function", "gelu_new") not in TANH_GELUS:
    problems.append(f"activation_function {config['activation_function']!r} (gpt2jax's MLP "
                    "uses GPT-2's tanh-approximated GELU, 'gelu_new')")
  if abs(config.get("layer_norm_epsilon", LAYER_NORM_EPSILON) - LAYER_NORM_EPSILON) > 1e-12:
    problems.append(f"layer_norm_epsilon {config['layer_norm_epsilon']} (gpt2jax uses 1e-5)")
  if config.get("n_inner") not in (None, 4 * n_embd):
    problems.append(f"n_inner {config['n_inner']} (gpt2jax's MLP is 4 x n_embd wide)")
  if not config.get("scale_attn_weights", True):
    problems.append("scale_attn_weights false")
  if config.get("scale_attn_by_inverse_layer_idx", False):
    problems.append("scale_attn_by_inverse_layer_idx true")
  if config.get("add_cross_attention", False):
    problems.append("add_cross_attention true")
  if problems:
    raise UserError(f"{path}: this GPT-2 variant computes something gpt2jax's model does not: "
                    f"{'; '.join(problems)}.")
  return GPT2Shape(
      vocab_size=int(config.get("vocab_size", 50257)),
      n_positions=int(config.get("n_positions", 1024)),
      n_embd=int(n_embd), n_layer=int(config.get("n_layer", 12)),
      n_head=int(config.get("n_head", 12)),
      tie_embeddings=bool(config.get("tie_word_embeddings", True)))


def _weight_files(directory: Path) -> list[Path]:
  if (directory / WEIGHTS_FILE).is_file():
    return [directory / WEIGHTS_FILE]
  if (directory / WEIGHTS_INDEX).is_file():
    weight_map = _read_json(directory / WEIGHTS_INDEX).get("weight_map", {})
    names = sorted(set(weight_map.values()))
    for name in names:
      if Path(name).name != name or not name.endswith(".safetensors"):
        raise UserError(f"{directory / WEIGHTS_INDEX} names {name!r}: shards must be "
                        ".safetensors files in the same directory.")
      if not (directory / name).is_file():
        raise UserError(f"{directory / WEIGHTS_INDEX} lists {name}, which is missing.")
    return [directory / name for name in names]
  refused = [name for name in _REFUSED_WEIGHTS if (directory / name).exists()]
  if refused:
    raise UserError(
        f"{directory} holds {refused[0]} but no {WEIGHTS_FILE}: gpt2jax reads safetensors only "
        "and never loads a pickle. Convert it where torch is installed: "
        f"GPT2LMHeadModel.from_pretrained('{directory}').save_pretrained('OUT') writes "
        f"OUT/{WEIGHTS_FILE}.")
  raise UserError(f"{directory} holds no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX}): save the model "
                  "with transformers' save_pretrained, which writes safetensors.")


def read_tensors(directory: str | Path) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint as a float32 numpy array, named without 'transformer.'."""
  from safetensors import safe_open

  tensors = {}
  for path in _weight_files(Path(directory)):
    try:
      with safe_open(str(path), framework="numpy") as f:
        for name in f.keys():
          tensors[name.removeprefix("transformer.")] = _get_float32(f, path, name)
    except Exception as e:  # noqa: BLE001 - safetensors' own error derives from Exception only
      if isinstance(e, UserError):
        raise
      raise UserError(f"{path} cannot be read as safetensors ({type(e).__name__}: {e}).") from e
  return {name: value for name, value in tensors.items() if not _BUFFER.search(name)}


def _get_float32(safetensors_file, path: Path, name: str) -> np.ndarray:
  try:
    return np.asarray(safetensors_file.get_tensor(name), np.float32)
  except TypeError:  # numpy has no bfloat16: widen its bits to float32 ourselves
    return _read_bfloat16(path, name)


def _read_bfloat16(path: Path, name: str) -> np.ndarray:
  """A BF16 tensor of a safetensors file (8-byte header size, JSON header, raw data)."""
  with open(path, "rb") as f:
    header_size = int.from_bytes(f.read(8), "little")
    entry = json.loads(f.read(header_size))[name]
    if entry["dtype"] != "BF16":
      raise UserError(f"{path}: tensor {name} has dtype {entry['dtype']}, not a float type.")
    begin, end = entry["data_offsets"]
    f.seek(8 + header_size + begin)
    bits = np.frombuffer(f.read(end - begin), "<u2").astype(np.uint32) << 16
  return bits.view(np.float32).reshape(entry["shape"])


def _layer_tensors(tensors: dict[str, np.ndarray], i: int) -> dict[str, Any]:
  take = lambda name: tensors.pop(f"h.{i}.{name}")
  dense = lambda name: {"kernel": take(f"{name}.weight"), "bias": take(f"{name}.bias")}
  norm = lambda name: {"scale": take(f"{name}.weight"), "bias": take(f"{name}.bias")}
  return {"ln_1": norm("ln_1"),
          "attn": {"c_attn": dense("attn.c_attn"), "c_proj": dense("attn.c_proj")},
          "ln_2": norm("ln_2"),
          "mlp": {"c_fc": dense("mlp.c_fc"), "c_proj": dense("mlp.c_proj")}}


def to_params(tensors: dict[str, np.ndarray], shape: GPT2Shape, *, block_size: int,
              scan_layers: bool = False) -> dict[str, Any]:
  """gpt2jax parameters (numpy) from the checkpoint's tensors: every one a GPT-2 of this shape
  needs must be there, and nothing else (check_shapes then compares the shapes)."""
  tensors = dict(tensors)
  try:
    params: dict[str, Any] = {
        "wte": {"embedding": tensors.pop("wte.weight")},
        "wpe": {"embedding": tensors.pop("wpe.weight")[:block_size]},
        "ln_f": {"scale": tensors.pop("ln_f.weight"), "bias": tensors.pop("ln_f.bias")},
    }
    layers = [_layer_tensors(tensors, i) for i in range(shape.n_layer)]
    head = tensors.pop("lm_head.weight", None)
  except KeyError as e:
    raise UserError(f"The checkpoint has no tensor {e.args[0]!r} (a GPT-2 of {shape.n_layer} "
                    "layers needs it): the files are incomplete or not GPT-2's.") from None
  if tensors:
    raise UserError(f"The checkpoint holds tensors a GPT-2 does not: {sorted(tensors)[:5]}.")
  if not shape.tie_embeddings:
    if head is None:
      raise UserError("config.json says tie_word_embeddings false, but the checkpoint has no "
                      "lm_head.weight.")
    params["lm_head"] = {"kernel": head.T}
  if scan_layers:
    import jax

    params["h"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  else:
    params.update({f"h_{i}": layer for i, layer in enumerate(layers)})
  return params


def check_shapes(params: dict, expected: dict, source: str) -> None:
  """Raises UserError naming the first parameter whose shape differs from `expected`'s."""
  import jax

  have = dict(jax.tree_util.tree_leaves_with_path(params))
  want = dict(jax.tree_util.tree_leaves_with_path(expected))
  for path, leaf in want.items():
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if path not in have:
      raise UserError(f"{source} has no parameter {name}.")
    if tuple(have[path].shape) != tuple(leaf.shape):
      raise UserError(f"{source}: {name} has shape {tuple(have[path].shape)}, the model needs "
                      f"{tuple(leaf.shape)}.")


def from_params(params: dict[str, Any], model_config) -> dict[str, np.ndarray]:
  """The tensors transformers' GPT2LMHeadModel expects, from gpt2jax parameters.

  A model without biases (model.bias=False) gets zero biases: GPT-2 always has them, and
  adding zero changes nothing.
  """
  import jax

  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  d = model_config.n_embd
  zeros = lambda n: np.zeros((n,), np.float32)
  if "h" in params:  # layers stacked by nn.scan
    layers = [jax.tree.map(lambda x, i=i: x[i], params["h"]) for i in range(model_config.n_layer)]
  else:
    layers = [params[f"h_{i}"] for i in range(model_config.n_layer)]
  tensors = {"transformer.wte.weight": params["wte"]["embedding"],
             "transformer.wpe.weight": params["wpe"]["embedding"]}
  for i, layer in enumerate(layers):
    prefix = f"transformer.h.{i}."
    for name, width in (("ln_1", d), ("ln_2", d)):
      tensors[prefix + f"{name}.weight"] = layer[name]["scale"]
      tensors[prefix + f"{name}.bias"] = layer[name].get("bias", zeros(width))
    for name, width in (("attn.c_attn", 3 * d), ("attn.c_proj", d), ("mlp.c_fc", 4 * d),
                        ("mlp.c_proj", d)):
      module, sub = name.split(".")
      tensors[prefix + f"{name}.weight"] = layer[module][sub]["kernel"]
      tensors[prefix + f"{name}.bias"] = layer[module][sub].get("bias", zeros(width))
  tensors["transformer.ln_f.weight"] = params["ln_f"]["scale"]
  tensors["transformer.ln_f.bias"] = params["ln_f"].get("bias", zeros(d))
  if not model_config.tie_embeddings:
    tensors["lm_head.weight"] = params["lm_head"]["kernel"].T
  return {name: np.ascontiguousarray(value) for name, value in tensors.items()}


def transformers_config(model_config, *, eos_id: int, dropout: float) -> dict:
  """config.json of a GPT2LMHeadModel with gpt2jax's model shape."""
  return {
      "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
      "vocab_size": model_config.vocab_size, "n_positions": model_config.block_size,
      "n_embd": model_config.n_embd, "n_layer": model_config.n_layer,
      "n_head": model_config.n_head, "n_inner": None, "activation_function": "gelu_new",
      "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout,
      "layer_norm_epsilon": LAYER_NORM_EPSILON, "initializer_range": 0.02,
      "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
      "reorder_and_upcast_attn": False, "use_cache": True,
      "tie_word_embeddings": model_config.tie_embeddings,
      "bos_token_id": eos_id, "eos_token_id": eos_id, "dtype": "float32",
  }


def write(directory: Path, tensors: dict[str, np.ndarray], config: dict) -> None:
  """config.json, generation_config.json and model.safetensors, as save_pretrained writes."""
  from safetensors.numpy import save_file

  directory.mkdir(parents=True, exist_ok=True)
  # transformers checks the "format" metadata before it loads a safetensors file.
  save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
  (directory / CONFIG_JSON).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
  generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
  (directory / GENERATION_CONFIG_JSON).write_text(json.dumps(generation, indent=2) + "\n",
                                                 encoding="utf-8")
