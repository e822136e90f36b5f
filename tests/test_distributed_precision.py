"""Multi-process DDP on CPU (gloo) and bf16-mixed precision.

DDP: 2 processes with batch 32 each against 1 process with batch 64 (the same global batch):
the same number of steps per epoch (each rank reads its own half), only one run folder and
W&B run (rank 0 writes), and the same quality within tolerance.
bf16-mixed: one optimizer step for every task, cell and implementation on CPU.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from lightning.pytorch import Trainer

from data_modules import ChoralesDataModule, CharTextDataModule, SumsDataModule
from seqmodels.tasks import CharLanguageModel, NetworkConfig, PolyphonicMusicModel, SumsRegressor
from tests.conftest import ROOT
from tests.test_chorales_data import write_pickle

SUMS = ["--trainer.max_epochs=4", "--data.init_args.train_size=1024", "--data.init_args.val_size=256",
        "--data.init_args.test_size=256", "--data.init_args.test_lengths=[20]",
        "--model.init_args.network.hidden_size=16", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]  # the schedule follows max_epochs: no T_max


def fit_sums(tmp_path, name: str, *extra: str) -> tuple[dict, subprocess.CompletedProcess]:
    """Fit then test sums_lstm in its own folder; the test metrics printed by Lightning."""
    folder = tmp_path / name
    folder.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", WANDB_SILENT="true")
    config = str(ROOT / "configs" / "sums_lstm.yaml")
    fit = subprocess.run([sys.executable, str(ROOT / "cli.py"), "fit", "--config", config, *SUMS, *extra],
                         cwd=folder, env=env, capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (ckpt,) = folder.glob("runs/seqmodels/*/checkpoints/last.ckpt")
    return torch.load(ckpt, map_location="cpu", weights_only=True), fit


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single, _ = fit_sums(tmp_path, "single", "--data.init_args.batch_size=64")
    ddp, run = fit_sums(tmp_path, "ddp", "--data.init_args.batch_size=32", "--trainer.strategy=ddp",
                        "--trainer.devices=2", "--trainer.accelerator=cpu")
    assert "distributed_backend=gloo" in run.stderr and "Starting with 2 processes" in run.stderr
    # each rank reads its own half: 1024 / (2 x 32) = 16 steps per epoch, as 1024 / 64
    assert ddp["global_step"] == single["global_step"] == 4 * 16
    # rank 0 alone writes: one run folder, one W&B run, one config file
    assert len(list((tmp_path / "ddp" / "runs" / "seqmodels").iterdir())) == 1
    assert len(list((tmp_path / "ddp" / "runs" / "wandb").glob("offline-run-*"))) == 1
    assert len(list((tmp_path / "ddp").rglob("cli_config.yaml"))) == 1
    # the same training: rank r reads samples r, r + 2, ... of the epoch's permutation (seeded
    # by (seed, epoch) as with one process), so the two ranks' batches of 32 together are the
    # single process's batch of 64 and the averaged gradients are the same; only float
    # summation order differs. val/loss is synced over ranks. Both learned (below the target
    # variance 20/3 of a sum of 20 uniform(-1, 1)).
    scores = []
    for run_ckpt in (single, ddp):
        (best,) = [v for k, v in run_ckpt["callbacks"].items() if "val/loss" in k]
        scores.append(float(best["best_model_score"]))
    assert max(scores) < 0.6 * 20 / 3, scores
    assert abs(scores[0] - scores[1]) <= 1e-3 * max(scores), scores
    for name, tensor in single["state_dict"].items():
        assert torch.allclose(tensor, ddp["state_dict"][name], rtol=1e-3, atol=1e-4), name


# ---- bf16-mixed: one step for every task, cell and implementation ------------------------
CELLS_IMPLS = [(cell, impl) for cell in ("rnn", "lstm") for impl in ("autograd", "bptt", "native")]


def one_bf16_step(model, data) -> None:
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(precision="bf16-mixed", accelerator="cpu", devices=1, max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, gradient_clip_val=1.0)
    trainer.fit(model, data)
    loss = trainer.callback_metrics["train/loss"]
    assert math.isfinite(float(loss))
    changed = [not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters())]
    assert all(changed), "every parameter gets a gradient step"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters()), "the weights stay float32"


@pytest.mark.parametrize("cell,impl", CELLS_IMPLS)
def test_bf16_mixed_sums(cell, impl):
    one_bf16_step(SumsRegressor(network=NetworkConfig(cell=cell, hidden_size=8, impl=impl)),
                  SumsDataModule(train_size=64, val_size=8, test_size=8, batch_size=16, seq_len=6))


@pytest.mark.parametrize("cell,impl", CELLS_IMPLS)
def test_bf16_mixed_text(cell, impl, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("to be or not to be, that is the question\n" * 40)
    data = CharTextDataModule(path=str(path), batch_size=4, eval_batch_size=2, bptt=12,
                              cache_dir=str(tmp_path / "cache"))
    data.prepare()
    one_bf16_step(CharLanguageModel(vocab=data.vocab, embedding_dim=4, network=NetworkConfig(cell=cell, hidden_size=8, num_layers=2, impl=impl)), data)


@pytest.mark.parametrize("cell,impl", CELLS_IMPLS)
def test_bf16_mixed_music(cell, impl, tmp_path):
    songs = {s: [[tuple(60 + (t + k) % 5 for k in range(3)) for t in range(6 + i)] for i in range(n)]
             for s, n in (("train", 4), ("valid", 2), ("test", 2))}
    data = ChoralesDataModule(path=str(write_pickle(tmp_path / "tiny.pickle", songs)), batch_size=4,
                              cache_dir=str(tmp_path / "cache"), progress=False)
    one_bf16_step(PolyphonicMusicModel(network=NetworkConfig(cell=cell, hidden_size=8, impl=impl)), data)


def test_bf16_mixed_peephole_lstm_bptt():
    one_bf16_step(SumsRegressor(network=NetworkConfig(cell="lstm", peephole=True, hidden_size=8, impl="cpp")),
                  SumsDataModule(train_size=64, val_size=8, test_size=8, batch_size=16, seq_len=6))
