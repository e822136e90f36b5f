"""Errors a user can fix, so the CLI can print them as one line instead of a stack trace."""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the CLI prints its message as one line and exits with 2."""


class ConfigError(UserError, ValueError):
    """An impossible setting or unusable input; the message names it and says how to fix it."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss or the gradients stopped being finite; the message says where and what to try."""


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The outermost UserError in an exception's chain (jsonargparse wraps the original)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
