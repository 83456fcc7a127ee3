"""What every command-line entry point shares: flag parsing, quiet logs, user-facing errors.

Bad input ends with one `error: ...` line (two at most) on stderr and exit status 1, never a
Python traceback; `--verbose` adds the traceback. Ctrl-C outside the training loop (which
handles it itself, see gpt2jax.preemption) ends with "interrupted" and status 130.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import traceback
from typing import Callable, NoReturn, Sequence

from absl import flags, logging

from gpt2jax.errors import UserError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def _fail(message: str, *, verbose: bool) -> NoReturn:
  if verbose and sys.exc_info()[0] is not None:
    traceback.print_exc()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_ERROR)


def run_main(main: Callable[[], object], *, verbose: bool = False) -> None:
  """Runs main(); a UserError becomes one message on stderr and exit status 1.

  Library INFO logs (Orbax, JAX backend probing) are hidden unless verbose.
  """
  logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
  try:
    main()
  except UserError as e:
    _fail(str(e), verbose=verbose)
  except KeyboardInterrupt:
    if verbose:
      traceback.print_exc()
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)
  except OSError as e:  # a full disk, a path that cannot be written, ...
    where = f": {e.filename}" if e.filename else ""
    _fail(f"{e.strerror or e}{where}", verbose=verbose)


# Flag parsing. absl reports a malformed value in two lines of its own, but an unknown
# --config.x key, a missing config file or a broken one escape it as Python tracebacks;
# parse_flags turns each into one message.

def _verbose_requested(argv: Sequence[str]) -> bool:
  return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1")
             for a in argv)


def _config_file_argument(argv: Sequence[str], name: str = "config") -> str | None:
  """The value of --config=FILE[:args] or --config FILE, as typed."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _root_error(error: BaseException) -> str:
  """The innermost message of ml_collections' KeyError-inside-AttributeError chains."""
  message: object = error
  while isinstance(message, BaseException) and message.args:
    message = message.args[0]
  return str(message)


def _unknown_key_message(error: BaseException, argv: Sequence[str], name: str) -> str | None:
  """'--config.model.n_layers: no such key ...' when error is ml_collections' unknown key."""
  text = _root_error(error)
  key = text.split("\n", 1)[0].strip("'\"")
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  for arg in argv:
    if not arg.startswith(f"--{name}."):
      continue
    dotted = arg[2:].split("=", 1)[0]  # config.model.n_layers
    parts = dotted.split(".")[1:]
    if key in parts:
      where = ".".join(parts[:parts.index(key)])
      hint = ""
      if suggestion:
        hint = f" Did you mean --{name}.{where + '.' if where else ''}{suggestion.group(1)}?"
      place = f"config.{where}" if where else "the config"
      return (f"--{dotted}: {place} has no key {key!r}.{hint} The keys are listed in the "
              "README's config reference.")
  return None


def parse_flags(argv: Sequence[str], *, config_flag: str = "config") -> list[str]:
  """absl's flag parsing (app.run(..., flags_parser=parse_flags)) with one-line errors."""
  verbose = _verbose_requested(argv)
  config_file = _config_file_argument(argv, config_flag)
  if config_file is not None and config_file.split(":", 1)[0] and \
      not os.path.isfile(config_file.split(":", 1)[0]):
    _fail(f"--{config_flag}={config_file}: no such file. Use a recipe from configs/, e.g. "
          f"--{config_flag}=configs/shakespeare_char.py.", verbose=False)
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    _fail(_flag_error_message(str(e)), verbose=verbose)
  except (AttributeError, KeyError) as e:
    message = _unknown_key_message(e, argv, config_flag)
    if message is None:
      raise
    _fail(message, verbose=verbose)
  except Exception as e:  # the config file itself raised (syntax error, bad import, ...)
    if config_file is None:
      raise
    reason = (_root_error(e).splitlines() or [""])[0]
    _fail(f"--{config_flag}={config_file} could not be loaded: {type(e).__name__}: {reason} "
          "(--verbose shows the traceback)", verbose=verbose)


# absl's reasons for a value it cannot parse, and what was expected instead.
_EXPECTED = (
    ("invalid literal for int()", "an integer"),
    ("could not convert string to float", "a number"),
    ("Non-boolean argument to boolean flag", "true or false"),
)


def _flag_error_message(message: str) -> str:
  """absl's 'flag --x=v: reason' in one line that says what was expected.

  A config file that raised TypeError or ValueError arrives here with its whole traceback in
  the message; its last line says what went wrong.
  """
  lines = [line for line in message.strip().splitlines() if line.strip()]
  first = lines[0][len("flag "):] if lines[0].startswith("flag ") else lines[0]
  flag, _, reason = first.partition(": ")
  missing = re.search(r"Flag --(\w+) must have a value other than None", first)
  if missing:
    return f"--{missing.group(1)} is required" + (
        ", e.g. --config=configs/shakespeare_char.py" if missing.group(1) == "config" else ".")
  if "Error whilst parsing config file" in reason:
    return f"{flag} could not be loaded: {lines[-1].strip()}"
  for absl_reason, expected in _EXPECTED:
    if absl_reason in reason:
      return f"{flag}: expected {expected}."
  return f"{first} (--helpfull lists the flags)"


def resume_command(argv: Sequence[str], workdir: str | os.PathLike) -> str:
  """The command line that continues this run (the same one, with --workdir spelled out)."""
  args = list(argv[1:])
  if not any(a == "--workdir" or a.startswith("--workdir=") for a in args):
    args.append(f"--workdir={workdir}")
  return shlex.join(["python", argv[0], *args])
