"""Exact resume after SIGKILL: run A trains N steps uninterrupted; run B is the same run, killed
from outside after a periodic checkpoint, then resumed with ``--ckpt_path last``. B's final
weights, optimizer state and loss equal A's (deterministic mode, CPU)."""
from __future__ import annotations

import pytest

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from tests.conftest import ROOT

N_STEPS, EVERY, STALL_AT = 25, 5, 12  # the kill comes 2 steps after the checkpoint at step 10


def write_config(base: str, path: Path, overrides: dict, callbacks_extra: list | None = None) -> Path:
    """A copy of configs/<base>.yaml (over configs/base.yaml, as the CLI reads it): CSV or W&B
    logging under runs/, checkpoints every EVERY steps, no diagnostics plots (speed),
    deterministic, N_STEPS steps."""
    config = yaml.safe_load((ROOT / "configs" / f"{base}.yaml").read_text())
    shared = yaml.safe_load((ROOT / "configs" / "base.yaml").read_text())
    trainer = config["trainer"]
    trainer.pop("callbacks+", None)
    trainer.update(max_steps=N_STEPS, max_epochs=-1, deterministic=True, log_every_n_steps=1,
                   enable_progress_bar=False, enable_model_summary=False)
    keep = ("DivergenceGuard", "ExactResume", "LastCheckpoint", "ModelCheckpoint")
    trainer["callbacks"] = [c for c in shared["trainer"]["callbacks"] if c["class_path"].endswith(keep)]
    for callback in trainer["callbacks"]:
        if callback["init_args"].get("every_n_train_steps") if "init_args" in callback else False:
            callback["init_args"]["every_n_train_steps"] = EVERY
    trainer["callbacks"] += callbacks_extra or []
    for section, values in overrides.items():
        if section == "network":
            target = config["model"]["init_args"]["network"]
        else:
            target = config[section]["init_args"] if section in ("model", "data") else config[section]
        target.update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config: Path, cwd: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(config), *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def finish(process: subprocess.Popen) -> None:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]


def last_checkpoint(cwd: Path) -> Path:
    (path,) = cwd.glob("runs/*/*/checkpoints/last.ckpt")
    return path


def final_loss(cwd: Path) -> float:
    """The train loss logged at the last step, from the run's metrics.csv."""
    (metrics,) = cwd.glob("runs/*/*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/loss")]
    assert int(rows[-1]["step"]) == N_STEPS - 1
    return float(rows[-1]["train/loss"])


def run_killed_and_resumed(config_name: str, overrides: dict, tmp_path: Path, logger: dict) -> tuple[Path, Path]:
    """(A's folder, B's folder), both finished."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir(), b_dir.mkdir()
    overrides = {**overrides, "trainer": {"logger": logger}}
    a_cfg = write_config(config_name, tmp_path / "a.yaml", overrides)
    marker = tmp_path / "stalled"
    stall = {"class_path": "tests.helpers.stall.StallAfterStep",
             "init_args": {"step": STALL_AT, "marker": str(marker)}}
    b_cfg = write_config(config_name, tmp_path / "b.yaml", overrides, [stall])

    run_a = launch(a_cfg, a_dir)
    finish(run_a)  # one heavy job at a time: A, then B

    run_b = launch(b_cfg, b_dir)
    deadline = time.time() + 300
    while not marker.exists():
        assert run_b.poll() is None, run_b.communicate()[1][-3000:]
        assert time.time() < deadline, "run B never reached the crash point"
        time.sleep(0.2)
    run_b.send_signal(signal.SIGKILL)
    run_b.communicate(timeout=60)
    assert run_b.returncode == -signal.SIGKILL
    saved = torch.load(last_checkpoint(b_dir), map_location="cpu", weights_only=True)
    assert saved["global_step"] == 10, "the periodic checkpoint before the crash"

    resumed = launch(write_config(config_name, tmp_path / "b_resume.yaml", overrides), b_dir,
                     "--ckpt_path", "last")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming from" in err
    assert len(list(b_dir.glob("runs/*/*/checkpoints"))) == 1, "the resumed run continues in its own folder"
    return a_dir, b_dir


def assert_same_end(a_dir: Path, b_dir: Path) -> None:
    a = torch.load(last_checkpoint(a_dir), map_location="cpu", weights_only=True)
    b = torch.load(last_checkpoint(b_dir), map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == N_STEPS
    for name, tensor in a["state_dict"].items():
        assert torch.allclose(tensor, b["state_dict"][name], rtol=0, atol=1e-6), name
    for key, state in a["optimizer_states"][0]["state"].items():
        other = b["optimizer_states"][0]["state"][key]
        for field in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(state[field], other[field], rtol=0, atol=1e-6), (key, field)
    assert a["lr_schedulers"] == b["lr_schedulers"]


CSV_LOGGER = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "sums"}}


@pytest.mark.slow
def test_sums_resume_after_sigkill_equals_uninterrupted(tmp_path):
    # 2 layers with dropout between them: the RNG states must come back too. 10 steps per epoch,
    # so the kill falls mid-epoch (step 12) and the run crosses two epoch boundaries.
    overrides = {"network": {"num_layers": 2, "dropout": 0.3, "hidden_size": 16},
                 "data": {"train_size": 640, "val_size": 64, "test_size": 32, "test_lengths": [5]}}
    a_dir, b_dir = run_killed_and_resumed("sums_lstm", overrides, tmp_path, CSV_LOGGER)
    assert_same_end(a_dir, b_dir)
    assert abs(final_loss(a_dir) - final_loss(b_dir)) <= 1e-6


@pytest.mark.slow
def test_text_resume_after_sigkill_equals_uninterrupted(tmp_path):
    # Stateful TBPTT: the resumed run must continue the same streams from the same position
    # with the carried hidden state. 4 streams of ~900 characters, bptt 16: 56 batches per
    # epoch, so the kill and the resume fall mid-epoch with a carried state. W&B offline, so
    # the resumed run reuses the W&B run id.
    text = tmp_path / "corpus.txt"
    words = ["the", "king", "and", "queen", "of", "rome", "speak", "now", "my", "lord"]
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (8,), generator=gen).tolist())
             for _ in range(100)]
    text.write_text("\n".join(lines) + "\n")
    overrides = {"model": {"embedding_dim": 8}, "network": {"hidden_size": 16, "num_layers": 2, "dropout": 0.2},
                 "data": {"path": str(text), "batch_size": 4, "eval_batch_size": 2, "bptt": 16,
                          "cache_dir": str(tmp_path / "cache")}}
    wandb_logger = {"class_path": "lightning.pytorch.loggers.WandbLogger",
                    "init_args": {"project": "seqmodels", "save_dir": "runs"}}
    config = yaml.safe_load((ROOT / "configs" / "base.yaml").read_text())
    assert config["trainer"]["logger"]["class_path"].endswith("WandbLogger")
    a_dir, b_dir = run_killed_and_resumed("shakespeare_lstm", overrides, tmp_path, wandb_logger)
    assert_same_end(a_dir, b_dir)
    a = torch.load(last_checkpoint(a_dir), map_location="cpu", weights_only=True)
    b = torch.load(last_checkpoint(b_dir), map_location="cpu", weights_only=True)
    for x, y in zip(a["tbptt_carried_state"]["tensors"], b["tbptt_carried_state"]["tensors"]):
        assert torch.allclose(x, y, rtol=0, atol=1e-6)
