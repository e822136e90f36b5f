"""Errors a user can fix, so the CLI can print them as one line instead of a stack trace."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("seqmodels", "data_modules")
_SITE = {"site-packages", "dist-packages"}


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


def is_project_file(filename: str, root: Path = PROJECT_ROOT) -> bool:
    """Whether ``filename`` is this project's code: its packages, or anything else under its
    root (cli.py, tests) that is not an installed package (the root's own .venv)."""
    path = Path(os.path.abspath(filename))
    if not path.is_relative_to(root):
        return False
    parts = path.relative_to(root).parts
    if parts and parts[0] in PROJECT_PACKAGES:
        return True
    return not (_SITE & set(root.parts)) and not (_SITE & set(parts))


def raised_in_project(exc: BaseException) -> bool | None:
    """Whether the line that raised ``exc`` (its traceback's last frame) is this project's
    code; None without a traceback."""
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return is_project_file(tb.tb_frame.f_code.co_filename)


def find_framework_error(exc: BaseException | None) -> Exception | None:
    """The original error when a framework raised it (Lightning, torch, torchmetrics,
    jsonargparse, ... : any code outside this project), through the wrappers that frameworks
    put around it (jsonargparse re-raises an error of a class it instantiates ``from`` it).
    None when this project's own code raised any link of that chain (a bug keeps its
    traceback), and for an error that carries another process's traceback in its message
    (torch.multiprocessing's, from a spawned worker that was running the model)."""
    seen = set()
    while isinstance(exc, Exception) and id(exc) not in seen:
        seen.add(id(exc))
        if raised_in_project(exc) is not False or "Traceback (most recent call last)" in str(exc):
            return None
        if exc.__cause__ is None:
            return exc
        exc = exc.__cause__
    return None
