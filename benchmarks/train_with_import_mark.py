"""train.py, plus one stdout line once its imports are done (for benchmarks.command_profile).

  python benchmarks/train_with_import_mark.py <train.py's flags>

Imports train.py as a module (its imports: absl, ml_collections, jax, gpt2jax), prints
command_profile.IMPORT_MARK, then runs train.py's main exactly as `python train.py` does.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # as for `python train.py`, whose directory is the repository
sys.argv[0] = str(REPO / "train.py")  # resume commands name train.py

import train  # noqa: E402
from absl import app  # noqa: E402

from gpt2jax import cli  # noqa: E402

IMPORT_MARK = "[benchmarks] train.py imports done"  # = benchmarks.command_profile.IMPORT_MARK

if __name__ == "__main__":
  print(IMPORT_MARK, flush=True)
  app.run(train.main, flags_parser=cli.parse_flags)
