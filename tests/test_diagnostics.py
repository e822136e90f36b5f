"""Diagnostics: histograms, temporal gradient norms against autograd, clipping stats, the
exploding-gradient demo both ways, and what lands on disk and in an offline W&B run."""
from __future__ import annotations

import csv
import math
import re

import numpy as np
import pytest
import torch

from seqmodels.cli import main
from seqmodels.diagnostics import GradientDistribution, temporal_gradient_norms
from seqmodels.tasks import CharLanguageModel, NetworkConfig, SumsRegressor
from tests.conftest import ROOT

EXPLODE = str(ROOT / "configs" / "sums_rnn_explode.yaml")
SMALL = ["--data.init_args.train_size=256", "--data.init_args.val_size=64", "--data.init_args.test_size=64",
         "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false"]


def test_histograms_have_fixed_bins_and_bounded_memory():
    cb = GradientDistribution(every_n_steps=1, bins=20, log10_range=(-8, 2), max_iterations=4)
    hist = cb.histogram(torch.tensor([0.0, 1e-12, 1e-3, 1e-3, 0.5, 1e9]))
    assert hist.shape == (20,) and hist.sum() == 6
    assert hist[0] == 2 and hist[-1] == 1  # zeros/underflow in the first bin, overflow in the last
    assert hist[np.searchsorted(cb.edges, -3, side="right") - 1] == 2

    class FakeTrainer:
        global_step, is_global_zero, loggers = 0, True, []

    model = torch.nn.Linear(3, 2)
    model(torch.randn(5, 3)).sum().backward()
    trainer = FakeTrainer()
    cb.on_train_epoch_start(trainer, model)
    for step in range(50):
        trainer.global_step = step
        cb.on_before_optimizer_step(trainer, model, None)
    assert len(cb.iteration_steps) <= 4 and cb.iteration_steps[0] == 0
    assert all(len(h) == len(cb.iteration_steps) for h in cb.iteration_histograms.values())
    assert set(cb._current) == {"weight", "bias"} and cb._current["weight"].sum() == 50 * 6


def direct_norms(model, x, layers: int) -> np.ndarray:
    """‖∂L/∂h_t‖ by unrolling the cells by hand, keeping every h_t, and calling autograd."""
    hs_all, inputs = [], x
    B = x.shape[0]
    for layer in model.stack.layers:
        H = layer.cell.hidden_size
        state = tuple(torch.zeros(B, H) for _ in model.stack.kind.state)
        hs = []
        for t in range(x.shape[1]):
            state = layer.cell(inputs[:, t], state)
            hs.append(state[0])
        hs_all.append(hs)
        inputs = torch.stack(hs, 1)
    loss = torch.nn.functional.mse_loss(model.head(inputs[:, -1]), model._y)
    grads = torch.autograd.grad(loss, [h for hs in hs_all for h in hs])
    return np.array([float(g.norm()) for g in grads]).reshape(layers, x.shape[1])


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_temporal_norms_equal_direct_autograd(cell):
    torch.manual_seed(0)
    model = SumsRegressor(network=NetworkConfig(cell=cell, hidden_size=5, num_layers=2, impl="torch" if cell == "lstm" else "bptt"))
    x, y = torch.randn(3, 7, 1), torch.randn(3, 1)
    model._y = y
    norms = temporal_gradient_norms(model, (x, y))
    assert norms.shape == (2, 7)
    np.testing.assert_allclose(norms, direct_norms(model, x, 2), rtol=1e-5)
    assert model.stack.impl in ("torch", "cpp") and "forward" not in vars(model.stack)  # restored


def test_temporal_norms_of_a_many_to_many_model():
    torch.manual_seed(1)
    model = CharLanguageModel(vocab=["<unk>", *"abcd"], embedding_dim=3, network=NetworkConfig(hidden_size=6, num_layers=1))
    x = torch.randint(1, 5, (2, 9))
    norms = temporal_gradient_norms(model, (x, x, True))
    assert norms.shape == (1, 9) and (norms > 0).all()
    assert norms[0, -1] < norms[0, 0] * 50  # the summed loss reaches every step directly


@pytest.mark.parametrize("clip,fraction", [(1e-8, 1.0), (1e8, 0.0)])
def test_clip_fraction(clip, fraction, in_tmp_dir):
    cli = main(["fit", "--config", str(ROOT / "configs" / "sums_rnn.yaml"), *SMALL,
                f"--trainer.gradient_clip_val={clip}", "--trainer.logger=false",
                "--trainer.callbacks=[{class_path: seqmodels.diagnostics.ClippingStats}]"])
    metrics = cli.trainer.logged_metrics
    assert float(metrics["train/clip_fraction"]) == fraction
    assert math.isfinite(float(metrics["train/grad_norm"])) and float(metrics["train/grad_norm"]) > 0


def read_csv_metrics(root) -> list[dict]:
    (path,) = root.rglob("metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def test_exploding_demo_without_clipping_diverges_and_is_stopped(in_tmp_dir, capsys):
    """Unclipped, the loss turns nan; DivergenceGuard stops the run with one line, and no
    checkpoint holds non-finite weights."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", EXPLODE, *SMALL, "--trainer.gradient_clip_val=null",
              "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir=runs"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged at step" in errors[0], errors
    assert re.search(r"the (loss is (nan|inf|-inf)|gradient of \S+ is not finite)", errors[0]), errors[0]
    assert "gradient_clip_val" in errors[0]
    for ckpt in in_tmp_dir.rglob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt


@pytest.mark.slow
def test_exploding_demo_with_clipping_trains_and_writes_plots(in_tmp_dir, capsys):
    cli = main(["fit", "--config", EXPLODE, *SMALL, "--trainer.max_epochs=3",
                "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir=runs"])
    rows = read_csv_metrics(in_tmp_dir)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert all(math.isfinite(v) for v in losses)
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 3 and val[-1] < val[0]
    assert [float(r["train/clip_fraction"]) for r in rows if r.get("train/clip_fraction")] == [1.0, 1.0, 1.0]
    plots = {p.name for p in in_tmp_dir.rglob("plots/*.png")}
    assert {"gradients_by_epoch.png", "temporal_gradients.png", "gradients_by_iteration_epoch000.png",
            "gradients_by_iteration_epoch002.png"} <= plots
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert "length_generalization.png" in {p.name for p in in_tmp_dir.rglob("plots/*.png")}
    assert "<- training length" in capsys.readouterr().out


@pytest.mark.slow
def test_wandb_offline_run_gets_images_and_histograms(in_tmp_dir):
    cli = main(["fit", "--config", EXPLODE, *SMALL])
    import wandb

    run_files = cli.trainer.logger.experiment.dir
    wandb.finish()
    wandb.teardown()
    from pathlib import Path

    media = {p.name.split("_")[0] for p in Path(run_files).rglob("media/images/diagnostics/*.png")}
    assert {"temporal", "gradients"} <= media, media
    assert list((in_tmp_dir / "runs" / "seqmodels").glob("*/plots/temporal_gradients.png"))
    assert "train/grad_norm" in cli.trainer.logged_metrics


@pytest.mark.slow
def test_wandb_disabled_still_writes_plots(in_tmp_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    main(["fit", "--config", EXPLODE, *SMALL, "--trainer.max_epochs=1"])
    assert list(in_tmp_dir.rglob("plots/temporal_gradients.png"))
    assert list(in_tmp_dir.rglob("plots/gradients_by_epoch.png"))


def test_temporal_norms_of_the_music_model_with_padding():
    from seqmodels.tasks import PolyphonicMusicModel

    torch.manual_seed(2)
    model = PolyphonicMusicModel(input_size=88, network=NetworkConfig(cell="lstm", hidden_size=6))
    x = (torch.rand(3, 10, 88) < 0.05).float()
    lengths = torch.tensor([10, 6, 8])
    norms = temporal_gradient_norms(model, (x, lengths))
    assert norms.shape == (1, 9) and (norms[0, :5] > 0).all()


@pytest.mark.slow
def test_tensorboard_logger_gets_plots_and_metrics(in_tmp_dir):
    cli = main(["fit", "--config", EXPLODE, *SMALL, "--trainer.max_epochs=1",
                "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger", "--trainer.logger.save_dir=runs"])
    assert list(in_tmp_dir.rglob("plots/temporal_gradients.png"))
    assert list(in_tmp_dir.rglob("events.out.tfevents.*"))
    assert "train/clip_fraction" in cli.trainer.logged_metrics


def test_divergence_message_names_the_newest_checkpoint(tmp_path):
    """The best-model callback and LastCheckpoint both write; the message names the newer file."""
    import os
    from types import SimpleNamespace

    from seqmodels.guards import last_good_checkpoint

    best, last = tmp_path / "best-epoch00.ckpt", tmp_path / "last.ckpt"
    best.write_bytes(b"x"), last.write_bytes(b"x")
    os.utime(best, (1, 1))
    callbacks = [SimpleNamespace(last_model_path="", best_model_path=str(best)),
                 SimpleNamespace(last_model_path=str(last), best_model_path="")]
    assert last_good_checkpoint(SimpleNamespace(checkpoint_callbacks=callbacks)) == f"last good checkpoint: {last}"
    os.utime(last, (0, 0))
    assert last_good_checkpoint(SimpleNamespace(checkpoint_callbacks=callbacks)) == f"last good checkpoint: {best}"
    assert last_good_checkpoint(SimpleNamespace(checkpoint_callbacks=[])) == "no checkpoint was written yet"
