"""Polyphonic music benchmark: train on a canonical file within a time budget, pick the best
epoch on validation, and print the test frame-level NLL next to the published numbers and
two baselines computed on the same file.

    python benchmarks/chorales.py --path JSB_Chorales.mat --model lstm --minutes 20
    python benchmarks/chorales.py --path JSB_Chorales.mat --model rnn --minutes 20
    python benchmarks/chorales.py --path JSB_Chorales.mat --model lstm --minutes 20 --patience 50

``--patience N`` ends the run N epochs after the best validation NLL (EarlyStopping), so its
wall time says how long the model needs, not how long it was allowed. Either way the run
reports the minutes to its best epoch.

Training goes through the CLI with ``configs/jsb_lstm.yaml`` (``--model rnn`` swaps in the
vanilla RNN settings of ``RNN_OVERRIDES``), so the run is logged like any other (W&B,
checkpoints under runs/). The NLL is the published one: Σ over sequences of the BCE summed over
the 88 pitches, divided by Σ (T_i − 1); the first frame of a sequence is never predicted.

Baselines (no training, same file):
    frequency  each pitch on with its Laplace-smoothed frequency over all training frames
    previous   each pitch a two-state Markov chain: P(on | on or off in the previous frame),
               per pitch, Laplace-smoothed, estimated on the training transitions

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning.pytorch import Callback  # noqa: E402

# Published test NLL on JSB Chorales (Bai, Kolter & Koltun 2018, Table 1).
PAPER = {"RNN": 8.91, "LSTM": 8.45, "GRU": 8.43, "TCN": 8.10}

# The vanilla RNN's settings on top of configs/jsb_lstm.yaml (the same as configs/chorales_rnn.yaml).
RNN_OVERRIDES = ["--model.init_args.network.cell=rnn", "--model.init_args.network.nonlinearity=tanh",
                 "--optimizer.init_args.lr=0.002", "--lr_scheduler=null"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", required=True, help="a Boulanger-Lewandowski pickle or TCN .mat file")
    parser.add_argument("--model", choices=("lstm", "rnn", "gru"), default="lstm")
    parser.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    parser.add_argument("--config", default=None, help="default: configs/jsb_gru.yaml for --model gru, else jsb_lstm.yaml")
    parser.add_argument("--seed", type=int, default=None, help="seed_everything (default: the config's)")
    parser.add_argument("--patience", type=int, default=None,
                        help="stop N epochs after the best val/nll (default: train for the whole budget)")
    parser.add_argument("overrides", nargs="*", help="more CLI overrides, e.g. --model.init_args.network.hidden_size=128")
    args, extra = parser.parse_known_args(argv)
    args.overrides += extra  # CLI overrides start with --
    return args


def baselines(path: str) -> dict[str, float]:
    from data_modules.chorales import load_file
    from seqmodels.music import frequency_baseline, previous_frame_baseline

    rolls = load_file(path)
    return {"frequency": frequency_baseline(rolls["train"], rolls["test"]),
            "previous": previous_frame_baseline(rolls["train"], rolls["test"]),
            "frequency_val": frequency_baseline(rolls["train"], rolls["valid"]),
            "previous_val": previous_frame_baseline(rolls["train"], rolls["valid"])}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    from seqmodels.cli import main as cli_main

    base = baselines(args.path)
    seconds = int(round(args.minutes * 60))
    config = args.config or str(ROOT / "configs" / ("jsb_gru.yaml" if args.model == "gru" else "jsb_lstm.yaml"))
    cli_args = ["fit", "--config", config, f"--data.path={args.path}",
                f"--trainer.max_time=00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}",
                "--trainer.max_epochs=-1", "--trainer.enable_progress_bar=false"]
    if args.model == "rnn":
        cli_args += RNN_OVERRIDES
    if args.seed is not None:
        cli_args.append(f"--seed_everything={args.seed}")
    cli_args += args.overrides
    clock = EpochClock()
    callbacks = [clock]
    if args.patience is not None:
        from lightning.pytorch.callbacks import EarlyStopping

        callbacks.append(EarlyStopping(monitor="val/nll", mode="min", patience=args.patience))
    start = time.perf_counter()
    clock.start = start
    cli = cli_main(cli_args, trainer_defaults={"callbacks": callbacks})
    trained = time.perf_counter() - start
    trainer = cli.trainer
    checkpoint = trainer.checkpoint_callback
    best_epoch = int(torch_load_epoch(checkpoint.best_model_path))
    results = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=checkpoint.best_model_path,
                           verbose=False)[0]
    total = time.perf_counter() - start
    val_nll, test_nll = float(checkpoint.best_model_score), float(results["test/nll"])

    name = Path(args.path).name
    print(f"\nTest frame-level NLL on {name} (lower is better)")
    print(f"{'model':<44} {'test NLL':>9}")
    for model, nll in PAPER.items():
        print(f"{'Bai et al. 2018, ' + model + ' (published, JSB)':<44} {nll:>9.2f}")
    print(f"{'baseline: per-pitch training frequency':<44} {base['frequency']:>9.2f}")
    print(f"{'baseline: per-pitch previous-frame model':<44} {base['previous']:>9.2f}")
    print(f"{'this run: ' + args.model + f' (best epoch {best_epoch}, val {val_nll:.3f})':<44} {test_nll:>9.2f}")
    to_best = clock.minutes.get(best_epoch, float("nan"))
    device = str(cli.model.device)
    print(f"test acc {results['test/acc']:.4f}; {trainer.current_epoch} epochs in {trained / 60:.1f} min "
          f"(budget {args.minutes:g}), the best after {to_best:.1f} min, on {device}; checkpoint {checkpoint.best_model_path}")
    summary = {"model": args.model, "file": name, "test_nll": round(test_nll, 4), "val_nll": round(val_nll, 4),
               "baseline_frequency": round(base["frequency"], 4), "baseline_previous": round(base["previous"], 4),
               "minutes": round(total / 60, 2), "train_minutes": round(trained / 60, 2),
               "epochs": trainer.current_epoch, "best_epoch": best_epoch, "minutes_to_best": round(to_best, 2),
               "device": device, "precision": str(trainer.precision),
               "test_acc": round(float(results["test/acc"]), 4)}
    print(json.dumps(summary))
    return summary


class EpochClock(Callback):
    """Minutes from the start of fit to the end of each epoch's validation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.minutes: dict[int, float] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.minutes[trainer.current_epoch] = (time.perf_counter() - self.start) / 60


def torch_load_epoch(ckpt_path: str) -> int:
    import torch

    return torch.load(ckpt_path, map_location="cpu", weights_only=True)["epoch"]


if __name__ == "__main__":
    main()
