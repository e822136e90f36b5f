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
    """Run in an empty folder; afterwards finish the W&B run (Lightning never does) and reset
    wandb's process-wide state, so one test's mode (offline, disabled) never leaks into the next."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    import wandb

    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA: without it they are skipped, with the reason, not failed."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `python -m pytest -m gpu` on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
