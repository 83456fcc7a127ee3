"""notebooks/gpt2_from_scratch.ipynb runs top to bottom: every cell, every assert in it.

The test executes a copy in memory, in its quick setting (GPT2JAX_NOTEBOOK_QUICK=1: a few
training steps, short samples), and never writes the committed notebook. To refresh the
committed outputs after changing the notebook, run it in the full setting and save it:

  python tests/test_notebook.py
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "gpt2_from_scratch.ipynb"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def execute(*, quick: bool, timeout: int):
  """The notebook, executed from notebooks/ by a kernel that runs this interpreter."""
  import nbformat
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import AsyncKernelManager
  from nbclient import NotebookClient

  class Client(NotebookClient):
    def create_kernel_manager(self):
      # No kernel directories: "python3" is then ipykernel's own spec for sys.executable,
      # not whatever kernel of that name the machine has installed.
      specs = KernelSpecManager(kernel_dirs=[])
      assert specs.get_kernel_spec("python3").argv[0] == sys.executable
      self.km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)
      return self.km

  nb = nbformat.read(NOTEBOOK, as_version=4)
  env = dict(os.environ, GPT2JAX_NOTEBOOK_QUICK="1" if quick else "0", PYTHONIOENCODING="utf-8")
  env.setdefault("JAX_PLATFORMS", "cpu")  # no TPU backend probing when libtpu is installed
  if not quick:  # the committed outputs show what a reader's first run compiles
    env.setdefault("GPT2JAX_COMPILATION_CACHE", "off")
  env.pop("PYTHONPATH", None)  # the notebook's first cell must find gpt2jax, as a reader's does
  env.pop("MPLBACKEND", None)  # the kernel's own inline backend draws the figures into the outputs
  client = Client(nb, timeout=timeout, allow_errors=False,
                  resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute(env=env)
  nb.metadata["kernelspec"] = KERNELSPEC
  return nb


def test_notebook_runs_top_to_bottom():
  before = hashlib.sha256(NOTEBOOK.read_bytes()).hexdigest()
  nb = execute(quick=True, timeout=300)  # raises CellExecutionError on any error or assert
  assert hashlib.sha256(NOTEBOOK.read_bytes()).hexdigest() == before, "the notebook changed"
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert "quick mode: True" in "".join(o.get("text", "") for o in outputs)
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 2  # the loss curve and the attention heatmap


def test_committed_notebook_has_the_outputs_of_a_full_run():
  import nbformat

  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert all(cell.execution_count == i for i, cell in enumerate(code, start=1)), \
      "cells not executed once, top to bottom"
  text = "".join(o.get("text", "") for cell in code for o in cell.outputs)
  assert "quick mode: False" in text
  assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
  assert sum("image/png" in o.get("data", {}) for cell in code for o in cell.outputs) == 2
  assert NOTEBOOK.stat().st_size < 1_500_000
  assert nb.metadata.kernelspec.name == "python3"


if __name__ == "__main__":
  import nbformat

  executed = execute(quick=False, timeout=1200)
  nbformat.write(executed, NOTEBOOK)
  print(f"wrote {NOTEBOOK.relative_to(REPO)} ({NOTEBOOK.stat().st_size:,} bytes)")
