"""Checkpoints that survive crashes.

``AtomicCheckpointIO`` (``trainer.plugins``) writes every checkpoint to a temporary file in
the same folder, flushes it to disk, then renames it over the old one: a crash during the
write leaves the previous ``last.ckpt`` intact, never a truncated one. (Lightning's own
writer stages the file in the system temp folder, which is often another file system, where
the final move is a copy that a crash can cut short.)
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save into ``path`` via a temp file in the same folder + fsync + os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO with an atomic, same-folder write (see the module doc)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_torch_save(checkpoint, str(path))
