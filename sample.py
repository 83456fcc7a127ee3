"""Generate text from a trained run: python sample.py --prompt="..." [--workdir=runs/hebrew].

--init_from=DIR samples from a transformers GPT-2 directory instead. With
--attention_plot=attn.png it draws the attention weights over the prompt.
"""

import sys
from pathlib import Path

from absl import app, flags

from gpt2jax import cli, errors, plots, runs, sampling

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The run to sample from. Default: the most recently trained run in runs/.")
_PROMPT = flags.DEFINE_multi_string(
    "prompt", None, "Text to continue; repeat the flag for a batch of prompts. "
    "Leave out to start from the beginning of a document.")
_PROMPT_FILE = flags.DEFINE_string(
    "prompt_file", None, "UTF-8 file with one prompt per line (added to --prompt).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0 is off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1]; 1 is off.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed for sampling.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load. Default: the latest.")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "Instead of a workdir: a transformers GPT-2 directory (config.json, "
    "model.safetensors, tokenizer.json), used as it is.")
_USE_CACHE = flags.DEFINE_bool("use_cache", True, "Decode with the KV cache (fast).")
_ATTENTION_PLOT = flags.DEFINE_string(
    "attention_plot", None, "Instead of sampling, draw the attention weights of --layer and "
    "--head over the prompt's tokens into this PNG file.")
_LAYER = flags.DEFINE_integer("layer", 0, "With --attention_plot: the layer, counting from 0.")
_HEAD = flags.DEFINE_string(
    "head", "all", "With --attention_plot: the head, counting from 0, or 'all' for a grid.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")


def _prompts() -> list[str]:
  prompts = list(_PROMPT.value or [])
  if _PROMPT_FILE.value:
    path = Path(_PROMPT_FILE.value)
    if not path.is_file():
      raise errors.UserError(f"--prompt_file {path} does not exist.")
    prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line]
  return prompts


def _sample() -> None:
  loaded = runs.load_requested(_WORKDIR.value, _STEP.value, _INIT_FROM.value,
                                  doing="sampling from")
  if _ATTENTION_PLOT.value:
    _draw_attention(loaded)
    return
  options = sampling.SamplingOptions(
      max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value, top_p=_TOP_P.value)
  texts = sampling.complete_prompts(
      loaded, _prompts(), options, num_samples=_NUM_SAMPLES.value, seed=_SEED.value,
      use_cache=_USE_CACHE.value, warn=lambda m: print(m, file=sys.stderr))
  sys.stdout.reconfigure(encoding="utf-8")
  print("\n---------------\n".join(texts))


def _draw_attention(loaded: runs.LoadedModel) -> None:
  prompts = _prompts()
  if len(prompts) != 1:
    raise errors.UserError(f"--attention_plot draws one prompt; got {len(prompts)}: give "
                           "exactly one --prompt.")
  path = plots.draw_prompt_attention(loaded, prompts[0], _ATTENTION_PLOT.value,
                                     layer=_LAYER.value, head=_HEAD.value,
                                     warn=lambda m: print(m, file=sys.stderr))
  print(f"wrote {path}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.run_main(_sample, verbose=_VERBOSE.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
