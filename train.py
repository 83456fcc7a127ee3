"""Train a GPT-2: python train.py --config=configs/hebrew.py [--workdir=runs/hebrew].

Running the same command again resumes from the workdir's latest checkpoint. SIGTERM or
Ctrl-C saves a checkpoint within two steps and exits 0 (a second one aborts at once).
`--compile_only --topology=v5e:2x4` compiles the sharded train step for a TPU slice and
reports its memory and estimated step time, without a TPU (needs requirements-tpu.txt).
"""

import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from gpt2jax import aot, cli, parallel, train_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file from configs/; override values with --config.x.y=z.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where the run lives (checkpoints, tokenizer, metrics). "
    "Default: runs/<name of the config file>.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile the sharded train step, report memory, FLOPs and a "
    "roofline step time, and exit without training.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", "", "With --compile_only: a TPU slice to compile for, e.g. v5e:2x4, v4:2x2x2.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Multi-process runs outside Cloud TPU: HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-process runs: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-process runs: this process's index.")
flags.mark_flag_as_required("config")


def default_workdir(config_path: str) -> Path:
  return Path("runs") / Path(config_path.split(":")[0]).stem


def compile_only(config, workdir) -> None:
  if _TOPOLOGY.value:
    import os

    import jax

    # The TPU is only described, never used: keep JAX off any accelerator backend.
    jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or "cpu")
  for line in aot.compile_only(config, Path(workdir), _TOPOLOGY.value):
    print(line, flush=True)


def train(config, workdir) -> None:
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  train_lib.train_and_evaluate(config, workdir,
                               resume_command=cli.resume_command(sys.argv, workdir))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _TOPOLOGY.value and not _COMPILE_ONLY.value:
    raise app.UsageError("--topology needs --compile_only (training runs on this machine's "
                         "devices).")
  workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
  command = compile_only if _COMPILE_ONLY.value else train
  cli.run_main(lambda: command(_CONFIG.value, workdir), verbose=_VERBOSE.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
