"""Write a trained run as a transformers GPT-2: python -m gpt2jax.export --workdir=W --out=DIR.

DIR gets what `save_pretrained` writes for a GPT2LMHeadModel and its tokenizer (config.json,
generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json), so that
`AutoModelForCausalLM.from_pretrained(DIR)`, `AutoTokenizer.from_pretrained(DIR)` and
`pipeline("text-generation", model=DIR)` load it offline. Any tokenizer kind is written
(gpt2jax.hf_tokenizer). Before anything is written, the exported tokenizer's ids are checked
against gpt2jax's on the run's validation text and on a set of hard cases; afterwards the
weights are read back and compared. A check that fails writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from gpt2jax import cli, errors, hf_checkpoint, hf_tokenizer, runs
from gpt2jax.data import tokens as tokens_lib
from gpt2jax.data.normalize import strips_hebrew_marks
from gpt2jax.workdir import DATA_DIR

# Text on which tokenizers tend to differ: marks, spaces, digits, bytes, scripts, newlines.
HARD_CASES = (
    "בְּרֵאשִׁית בָּרָא אֱלֹהִים אֵת הַשָּׁמַיִם", "ויאמר אלהים יהי אור ויהי אור׃",
    "In the beginning God created the heaven and the earth.", "Hello,   world!\n\n\tTabs\r\n",
    "  leading and trailing  ", "digits 0123456789 3.14159 1,000,000", "emoji 😀🎉 and ñ, ü, ß",
    "a literal \u2581 sign", "mixed שלום world 123 עולם!", "----====____....", "\n\n\n",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "x", " ",
)
VALIDATION_TOKENS_CHECKED = 200_000


@dataclasses.dataclass
class ExportReport:
  out: Path
  texts_checked: int  # texts on which the tokenizer.json gave gpt2jax's ids
  tensors: int  # written, and read back equal


def _validation_texts(loaded: runs.LoadedModel) -> list[str]:
  """The documents at the start of the run's cached validation split, decoded."""
  ids = tokens_lib.read_cached_split(loaded.workdir / DATA_DIR, "val")
  if ids is None:
    return []
  ids = np.asarray(ids[:VALIDATION_TOKENS_CHECKED])
  ends = np.flatnonzero(ids == loaded.tokenizer.eos_id)
  starts = np.concatenate([[0], ends + 1])
  return [loaded.tokenizer.decode(ids[a:b]) for a, b in zip(starts, ends) if b > a]


def _check_weights_read_back(out: Path, loaded: runs.LoadedModel) -> None:
  """Reads out's weights as an import would and compares every parameter bit for bit."""
  cfg = loaded.model.config
  shape = hf_checkpoint.read_shape(out)
  back = hf_checkpoint.to_params(hf_checkpoint.read_tensors(out), shape,
                                 block_size=cfg.block_size, scan_layers=cfg.scan_layers)
  ours = jax.tree_util.tree_leaves_with_path(jax.device_get(loaded.params))
  theirs = dict(jax.tree_util.tree_leaves_with_path(back))
  for path, value in ours:
    if path not in theirs or not np.array_equal(np.asarray(value), theirs[path]):
      raise errors.UserError(f"Export check failed: {jax.tree_util.keystr(path)} did not read "
                             "back equal; nothing was written.")


def export_run(loaded: runs.LoadedModel, out: str | Path) -> ExportReport:
  """Writes loaded (a trained run) into the new directory out, checked; see the module doc."""
  out = Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise errors.UserError(f"--out {out} already exists: choose a new directory (nothing is "
                           "ever written over).")
  tokenizer, config, cfg = loaded.tokenizer, loaded.config, loaded.model.config
  json_text = hf_tokenizer.to_tokenizer_json(
      tokenizer, strip_hebrew_marks=strips_hebrew_marks(config.data))
  texts = list(HARD_CASES) + _validation_texts(loaded)
  differences = hf_tokenizer.export_differences(tokenizer, json_text, texts,
                                                loaded.normalize_prompt)
  if differences:
    raise errors.UserError(
        f"The {tokenizer.kind} tokenizer cannot be written as a tokenizer.json that gives "
        f"gpt2jax's ids ({len(differences)} of {len(texts)} texts differ, e.g. "
        f"{differences[0]}); nothing was written.")
  staging = out.with_name(out.name + ".export-tmp")
  shutil.rmtree(staging, ignore_errors=True)  # what an interrupted export left
  tensors = hf_checkpoint.from_params(jax.device_get(loaded.params), cfg)
  hf_checkpoint.write(staging, tensors, hf_checkpoint.transformers_config(
      cfg, eos_id=tokenizer.eos_id, dropout=config.model.dropout))
  (staging / "tokenizer.json").write_text(json_text, encoding="utf-8")
  (staging / hf_tokenizer.TOKENIZER_CONFIG_JSON).write_text(json.dumps(
      hf_tokenizer.tokenizer_config(tokenizer, block_size=cfg.block_size), indent=2,
      ensure_ascii=False) + "\n", encoding="utf-8")
  _check_weights_read_back(staging, loaded)
  if out.exists():
    out.rmdir()  # empty, checked above
  os.replace(staging, out)
  return ExportReport(out, len(texts), len(tensors))


def _export() -> None:
  options = flags.FLAGS
  loaded = runs.load_requested(options.workdir, options.step, doing="exporting")
  report = export_run(loaded, options.out)
  print(f"wrote {report.out}: {loaded.name}, {loaded.tokenizer.kind} tokenizer; "
        f"{report.tensors} tensors read back equal, tokenizer ids equal to gpt2jax's on "
        f"{report.texts_checked:,} texts.\n"
        f"Load it with transformers: AutoModelForCausalLM.from_pretrained({str(report.out)!r}) "
        f"and AutoTokenizer.from_pretrained({str(report.out)!r}).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.run_main(_export, verbose=flags.FLAGS.verbose)


if __name__ == "__main__":
  # Defined here, not on import: the tests and other tools import export_run.
  flags.DEFINE_string("workdir", None,
                      "The run to export. Default: the most recently trained run in runs/.")
  flags.DEFINE_string("out", None, "A new directory for the transformers model.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step to export. Default: the latest.")
  flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")
  app.run(main, flags_parser=cli.parse_flags)
