"""Crash safety: atomic checkpoint writes."""
from __future__ import annotations

import pytest
import torch

from seqmodels import checkpointing
from seqmodels.checkpointing import AtomicCheckpointIO


def test_a_crash_during_a_checkpoint_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    before = path.read_bytes()

    def crash_mid_write(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpointing.torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left behind
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 3}, path)
    assert io.load_checkpoint(path)["global_step"] == 3
