"""Train a GPT-2: python train.py --config=configs/hebrew.py [--workdir=runs/hebrew].

Running the same command again resumes from the workdir's latest checkpoint. SIGTERM or
Ctrl-C saves a checkpoint after the current step and exits 0 (a second one aborts at once).
"""

import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from gpt2jax import cli, train_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file from configs/; override values with --config.x.y=z.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where the run lives (checkpoints, tokenizer, metrics). "
    "Default: runs/<name of the config file>.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")
flags.mark_flag_as_required("config")


def default_workdir(config_path: str) -> Path:
  return Path("runs") / Path(config_path.split(":")[0]).stem


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
  cli.run_main(
      lambda: train_lib.train_and_evaluate(
          _CONFIG.value, workdir, resume_command=cli.resume_command(sys.argv, workdir)),
      verbose=_VERBOSE.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
