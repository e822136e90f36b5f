"""The cost of each diagnostics callback at its configured frequency, as a share of training time.

    python benchmarks/diagnostics.py --config configs/shakespeare_lstm.yaml --steps 150

Trains ``--steps`` steps (W&B offline, so histograms and images are really built) with
every hook of every ``seqmodels.diagnostics`` callback timed. Step-level hooks are charged
per step; epoch-level hooks (the temporal-gradient probe, the epoch plots) are charged
once per full epoch of the config's data, so the share printed is what a real run pays:

    overhead = step-hook time per step / step time + epoch-hook time / (steps per epoch × step time)

Its last line is one JSON object.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning.pytorch import Callback  # noqa: E402

EPOCH_HOOKS = {"on_train_start", "on_train_epoch_end", "on_train_epoch_start", "on_test_end"}


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def time_hooks(callback: Callback, ledger: dict[str, float]) -> None:
    """Wrap every hook the callback overrides so that its time adds up in ``ledger``."""
    for name in dir(Callback):
        if name.startswith("on_") and name in type(callback).__dict__:
            hook = getattr(callback, name)

            @functools.wraps(hook)
            def timed(*args, _hook=hook, _name=name, **kwargs):
                start = time.perf_counter()
                try:
                    return _hook(*args, **kwargs)
                finally:
                    kind = "epoch" if _name in EPOCH_HOOKS else "step"
                    ledger[kind] = ledger.get(kind, 0.0) + time.perf_counter() - start

            setattr(callback, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "shakespeare_lstm.yaml"))
    parser.add_argument("--steps", type=int, default=150)
    args, extra = parser.parse_known_args()
    args.config = os.path.abspath(args.config)
    os.environ.setdefault("WANDB_MODE", "offline")

    from seqmodels.cli import main as cli_main

    out = tempfile.mkdtemp(prefix="bench-diagnostics-")
    os.chdir(out)
    step_timer = StepTimer()
    cli = cli_main(["--config", args.config, f"--trainer.limit_train_batches={args.steps}",
                    "--trainer.limit_val_batches=2", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
                    "--trainer.logger.init_args.save_dir=runs", *extra],
                   trainer_defaults={"callbacks": [step_timer]}, run=False)
    ledgers: dict[str, dict[str, float]] = {}
    for cb in cli.trainer.callbacks:
        if type(cb).__module__ == "seqmodels.diagnostics":
            ledgers[type(cb).__name__] = {}
            time_hooks(cb, ledgers[type(cb).__name__])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    dm = cli.datamodule
    steps_per_epoch = len(dm.train_dataloader()) if hasattr(dm, "train_dataloader") else args.steps
    times = sorted(step_timer.times[5:])  # after warm-up
    step_time = times[len(times) // 2]
    steps = len(step_timer.times)
    rows = {}
    for name, ledger in ledgers.items():
        per_step = ledger.get("step", 0.0) / steps
        per_epoch = ledger.get("epoch", 0.0)
        rows[name] = 100 * (per_step / step_time + per_epoch / (steps_per_epoch * step_time))
    print(f"\nconfig {args.config}: median step {1000 * step_time:.1f} ms, {steps_per_epoch} steps per epoch")
    print(f"{'callback':<24} {'overhead % of training time':>28}")
    for name, pct in rows.items():
        print(f"{name:<24} {pct:>28.2f}")
    print(f"{'all together':<24} {sum(rows.values()):>28.2f}")
    print(json.dumps({"config": os.path.basename(args.config), "step_ms": 1000 * step_time,
                      "steps_per_epoch": steps_per_epoch, "overhead_percent": rows,
                      "total_percent": sum(rows.values())}))


if __name__ == "__main__":
    main()
