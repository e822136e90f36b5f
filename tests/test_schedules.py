"""WarmupCosineLR: the equation, sized to the Trainer's steps or its time limit, through the CLI."""
from __future__ import annotations

import io
import math

import pytest
import torch

from seqmodels.errors import ConfigError
from seqmodels.schedules import WarmupCosineLR
from tests.conftest import ROOT
from tests.test_cli_end_to_end import TINY


def make(**kwargs) -> tuple[torch.optim.Optimizer, WarmupCosineLR]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    return optimizer, WarmupCosineLR(optimizer, **kwargs)


def lrs(optimizer, scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_then_cosine_to_the_floor():
    optimizer, scheduler = make(warmup_steps=4, total_steps=20, final_fraction=0.1)
    got = lrs(optimizer, scheduler, 22)
    for t, lr in enumerate(got):
        warm = min(1.0, (t + 1) / 4)
        cos = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 20) / 20))
        assert lr == pytest.approx(2.0 * warm * cos, rel=1e-12), t
    assert got[0] == pytest.approx(2.0 * 0.25 * (0.1 + 0.9), rel=1e-12)
    assert got[20] == got[21] == pytest.approx(0.2), "holds the floor after the end"


def test_time_budget_drives_the_progress_when_it_is_ahead():
    optimizer, scheduler = make(warmup_steps=0, total_steps=1000)
    spent = {"fraction": 0.5}
    scheduler.time_fraction = lambda: spent["fraction"]
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0), "half the time spent: half-way down the cosine"
    spent["fraction"] = 1.3
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    state = scheduler.state_dict()
    assert "time_fraction" not in state, "the closure over the Trainer is not saved"
    torch.save(state, io.BytesIO())


@pytest.mark.parametrize("kwargs, words", [
    ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
    ({"total_steps": 0}, "total_steps must be >= 1"),
    ({"final_fraction": 1.5}, "final_fraction"),
])
def test_impossible_settings_are_refused(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        make(**kwargs)


SCHEDULE = ["--lr_scheduler=seqmodels.schedules.WarmupCosineLR", "--lr_scheduler.warmup_steps=3",
            "--lr_scheduler.interval=step",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir=runs"]


@pytest.mark.slow
def test_cli_steps_it_every_step_and_sizes_it_to_the_run(in_tmp_dir):
    from seqmodels.cli import main

    cli = main(["fit", "--config", str(ROOT / "configs" / "sums_lstm.yaml"), *TINY, *SCHEDULE])
    scheduler = cli.trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step"
    steps = cli.trainer.global_step
    assert scheduler.scheduler.total_steps == steps == cli.trainer.estimated_stepping_batches
    assert scheduler.scheduler.last_epoch == steps
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12), "ends at the floor"


@pytest.mark.slow
def test_cli_follows_the_time_limit_without_max_epochs(in_tmp_dir):
    from seqmodels.cli import main

    args = [a for a in TINY if not a.startswith("--trainer.max_epochs")]
    cli = main(["fit", "--config", str(ROOT / "configs" / "sums_lstm.yaml"), *args, *SCHEDULE,
                "--trainer.max_epochs=-1", "--trainer.max_time=00:00:00:04"])
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps is None and scheduler.time_fraction is not None
    assert cli.trainer.global_step > 1
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] < 0.05 * scheduler.base_lrs[0], "annealed by the clock"


@pytest.mark.slow
def test_epoch_interval_is_cosine_annealing_sized_to_the_run(in_tmp_dir):
    """interval: epoch, no warm-up: the learning rate of every epoch is torch's
    CosineAnnealingLR(T_max = max_epochs), and it follows max_epochs given on the command line
    (no T_max to edit)."""
    import math

    from seqmodels.cli import main

    for epochs in (4, 6):
        main(["fit", "--config", str(ROOT / "configs" / "sums_lstm.yaml"), f"--trainer.max_epochs={epochs}",
                    "--data.init_args.train_size=64", "--data.init_args.val_size=16", "--data.init_args.test_size=16",
                    "--data.init_args.test_lengths=[5]", "--trainer.enable_progress_bar=false",
                    "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir=runs",
                    "--trainer.callbacks=[]", "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"])
        import csv

        metrics = max(in_tmp_dir.glob("runs/**/metrics.csv"), key=lambda p: p.stat().st_mtime)  # this run's
        logged = sorted((int(row["step"]), float(row["lr-Adam"])) for row in csv.DictReader(metrics.open())
                        if row.get("lr-Adam"))  # one row per epoch start
        lrs = dict(enumerate(lr for _, lr in logged))
        reference = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.Adam([torch.zeros(1)], lr=0.005), T_max=epochs)
        expected = []
        for _ in range(epochs):
            expected.append(reference.get_last_lr()[0])
            reference.optimizer.step()
            reference.step()
        assert [lrs[e] for e in range(epochs)] == pytest.approx(expected, rel=1e-9), (epochs, lrs)
        assert lrs[epochs - 1] > 0 and not math.isclose(lrs[epochs - 1], 0.0)
