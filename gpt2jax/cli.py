"""What every command-line entry point shares: quiet logs and user-facing errors."""

from __future__ import annotations

import sys
from typing import Callable

from absl import logging

from gpt2jax.errors import UserError


def run_main(main: Callable[[], object], *, verbose: bool = False) -> None:
  """Runs main(); a UserError becomes one message on stderr and exit status 1.

  Library INFO logs (Orbax, JAX backend probing) are hidden unless verbose.
  """
  logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
  try:
    main()
  except UserError as e:
    if verbose:
      logging.exception("gpt2jax stopped")
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
