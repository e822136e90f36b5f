"""Shared test setup: W&B offline and never prompting, each test in its own folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch):
    """Run in an empty folder, and finish the W&B run afterwards (Lightning never does)."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    import wandb

    if wandb.run is not None:
        wandb.finish()
