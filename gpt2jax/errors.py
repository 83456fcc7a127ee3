"""Errors meant for the person at the keyboard."""


class UserError(ValueError):
  """Bad input or state the user can fix; the message says how. Shown without a traceback."""
