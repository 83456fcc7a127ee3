"""Score a trained run on any text: python -m gpt2jax.evaluate --workdir=W --text_file=F.

--init_from=DIR scores a transformers GPT-2 directory instead of a run.

Prints loss (nats per token), perplexity, bits per byte and bits per character over the whole
file (see gpt2jax.scoring for the sliding windows); --json prints one JSON object instead.
"""

import json
import sys

from absl import app, flags

from gpt2jax import cli, errors, runs, scoring

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The run to evaluate. Default: the most recently trained run in runs/.")
_TEXT_FILE = flags.DEFINE_string("text_file", None, "A UTF-8 text file to score.",
                                 required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load. Default: the latest.")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "Instead of a workdir: a transformers GPT-2 directory (config.json, "
    "model.safetensors, tokenizer.json), used as it is.")
_STRIDE = flags.DEFINE_integer(
    "stride", None, "Tokens each sliding window moves on; every scored token sees at least "
    "block_size - stride tokens of context. Default: a quarter of the block; 1 is the most "
    "context (and the slowest).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Windows per forward pass.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")


def _evaluate() -> None:
  if _BATCH_SIZE.value < 1:
    raise errors.UserError(f"--batch_size must be at least 1, got {_BATCH_SIZE.value}.")
  text = scoring.read_text_file(_TEXT_FILE.value)
  loaded = runs.load_requested(_WORKDIR.value, _STEP.value, _INIT_FROM.value,
                                  doing="evaluating")
  block = loaded.model.config.block_size
  stride = _STRIDE.value or scoring.default_stride(block)
  score, scored_text = scoring.score_text(loaded, text, stride=stride,
                                          batch_size=_BATCH_SIZE.value)
  sys.stdout.reconfigure(encoding="utf-8")
  if _JSON.value:
    print(json.dumps({"workdir": str(loaded.workdir),
                      "step": loaded.step if loaded.from_workdir else None,
                      "text_file": _TEXT_FILE.value, "block_size": block, "stride": stride,
                      "normalized": scored_text != text, **score.as_dict()}))
    return
  print(f"{loaded.name} on {_TEXT_FILE.value}: {score.tokens:,} tokens, "
        f"{score.characters:,} characters, {score.bytes:,} bytes "
        f"(windows of {block} tokens, stride {stride})")
  if scored_text != text:
    print(f"the text was normalized as the training corpus was: {len(text):,} -> "
          f"{score.characters:,} characters")
  print(f"loss {score.loss:.4f} nats/token, perplexity {score.perplexity:.2f}, "
        f"{score.bits_per_byte:.4f} bits/byte, {score.bits_per_character:.4f} bits/character")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.run_main(_evaluate, verbose=_VERBOSE.value)


if __name__ == "__main__":
  app.run(main)
