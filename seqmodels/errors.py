"""One exception type for settings a user got wrong, so the CLI can print it in one line."""
from __future__ import annotations


class ConfigError(ValueError):
    """An impossible setting or unusable input; the message names it and says how to fix it."""


def find_config_error(exc: BaseException | None) -> ConfigError | None:
    """The outermost ConfigError in an exception's chain (jsonargparse wraps the original)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
