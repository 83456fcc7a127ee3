"""Score a trained run on any text: python -m gpt2jax.evaluate --workdir=W --text_file=F.

--init_from=DIR scores a transformers GPT-2 directory instead of a run.

Prints loss (nats per token), perplexity, bits per byte and bits per character over the whole
file (see gpt2jax.scoring for the sliding windows); --json prints one JSON object instead.
The file is streamed in bounded memory, with a progress bar and the time left on stderr.
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
    "block_size - stride tokens of context, and the model reads each token block_size / "
    "stride times. Default: half the block; 1 is the most context (and the slowest).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Windows per forward pass. Default: 32, fewer when their logits would "
    "take more than 128 MB (a GPT-2 of 1,024 positions x 50,257 tokens: one).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar with the time left.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")


def _evaluate() -> None:
  if _BATCH_SIZE.value is not None and _BATCH_SIZE.value < 1:
    raise errors.UserError(f"--batch_size must be at least 1, got {_BATCH_SIZE.value}.")
  text_file = scoring.check_text_file(_TEXT_FILE.value)
  loaded = runs.load_requested(_WORKDIR.value, _STEP.value, _INIT_FROM.value,
                                  doing="evaluating")
  block = loaded.model.config.block_size
  stride = _STRIDE.value or scoring.default_stride(block)
  scoring.check_stride(stride, block)
  batch_size = _BATCH_SIZE.value or scoring.default_batch_size(loaded.model.config)
  size = text_file.stat().st_size
  shown = f"{size / 1e6:,.1f} MB" if size >= 100_000 else f"{size:,} bytes"
  print(f"scoring {text_file} ({shown}) in {scoring.stride_cost(block, stride)}; "
        f"{batch_size} windows per forward pass", file=sys.stderr, flush=True)
  result = scoring.score_file(loaded, text_file, stride=stride, batch_size=batch_size,
                              progress=_PROGRESS.value)
  score = result.score
  sys.stdout.reconfigure(encoding="utf-8")
  if _JSON.value:
    print(json.dumps({"workdir": str(loaded.workdir),
                      "step": loaded.step if loaded.from_workdir else None,
                      "text_file": _TEXT_FILE.value, "block_size": block, "stride": stride,
                      "batch_size": batch_size,
                      "normalized": result.normalized, "seconds": result.seconds,
                      **score.as_dict()}))
    return
  print(f"{loaded.name} on {_TEXT_FILE.value}: {score.tokens:,} tokens, "
        f"{score.characters:,} characters, {score.bytes:,} bytes "
        f"(windows of {block} tokens, stride {stride}; {result.seconds:.1f} s, "
        f"{score.tokens / max(result.seconds, 1e-9):,.0f} tokens/s)")
  if result.normalized:
    print(f"the text was normalized as the training corpus was: {result.raw_characters:,} -> "
          f"{score.characters:,} characters")
  print(f"loss {score.loss:.4f} nats/token, perplexity {score.perplexity:.2f}, "
        f"{score.bits_per_byte:.4f} bits/byte, {score.bits_per_character:.4f} bits/character")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.run_main(_evaluate, verbose=_VERBOSE.value)


if __name__ == "__main__":
  app.run(main)
