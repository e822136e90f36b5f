"""Where seqmodels keeps what outlives a run: converted data, encoded text, autotune decisions."""
from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/seqmodels``, else ``~/.cache/seqmodels``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "seqmodels"
