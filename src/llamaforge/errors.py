"""One base class for errors caused by the user's input.

The CLI prints any `UserError` as one line (`llamaforge VERB: error: ...`) and exits with
code 2; anything else is a bug and keeps its traceback. Subclasses say *what* and *where*
(file:line, config key, path) in their message.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (a file, a config key, a data row, a CLI argument)."""


class NonFiniteLossError(UserError, RuntimeError):
    """The loss (or gradient) was NaN/inf for too many optimizer steps in a row."""
