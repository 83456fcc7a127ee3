"""Trains a tiny run and kills itself with SIGKILL at one stage of the save of KILL_STEP.

  python tests/kill_during_save.py WORKDIR CORPUS STAGE

Used by tests/test_preemption.py to check that a kill -9 at any moment of a save leaves a
workdir that resumes from its last complete checkpoint. The stages, in the order Orbax goes
through them (checkpoint N is written into N.orbax-checkpoint-tmp/, then renamed to N/):

  writing    the `params` item is written but not yet committed inside the temporary directory
  renaming   every item is complete, the step directory is not yet renamed
  renamed    right after the rename, before the older checkpoints are deleted (keep=1)
  deleting   half way through deleting the previous checkpoint
"""

import os
import shutil
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_config  # noqa: E402

KILL_STEP = "20"
STAGES = ("writing", "renaming", "renamed", "deleting")


def config(corpus: str):
  return tiny_config(corpus, train__num_steps=int(KILL_STEP), train__checkpoint_every=10,
                     train__keep_checkpoints=1, train__sample_tokens=0, model__dropout=0.1,
                     train__decay_steps=30)


def _die(stage: str, where: Path) -> None:
  print(f"killed at {stage}: {where}", flush=True)
  os.kill(os.getpid(), signal.SIGKILL)


def _install(stage: str) -> None:
  from orbax.checkpoint._src.path import atomicity, deleter

  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize_then_maybe_die(self):
    final = Path(self._final_path)
    saving_kill_step = final.name == KILL_STEP or final.parent.name.startswith(KILL_STEP + ".")
    if saving_kill_step and stage == "writing" and final.name == "params":
      _die(stage, final)
    if saving_kill_step and stage == "renaming" and final.name == KILL_STEP:
      _die(stage, final)
    await finalize(self)
    if saving_kill_step and stage == "renamed" and final.name == KILL_STEP:
      _die(stage, final)

  delete = deleter.PathDeleter.delete

  def delete_half_then_die(self, path, **kwargs):
    if stage == "deleting":
      shutil.rmtree(Path(path) / "params")
      _die(stage, Path(path))
    return delete(self, path, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize_then_maybe_die
  deleter.PathDeleter.delete = delete_half_then_die


def main(workdir: str, corpus: str, stage: str) -> None:
  assert stage in STAGES, stage
  _install(stage)
  from gpt2jax import train_lib

  train_lib.train_and_evaluate(config(corpus), workdir)
  print("finished without being killed", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:4])
