"""The errors a user can fix: `hardneg` prints them as one line and exits with 2 (`--debug` shows the traceback).

Everything else is a bug or an environment failure and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user gave (a path, a value, an address) cannot be used; the message says what to fix."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Every exception type that means "fix your input", imported lazily so the command line starts fast."""
    from .config import ConfigError
    from .read import InputError

    return UserError, ConfigError, InputError
