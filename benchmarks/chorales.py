"""Polyphonic music benchmark: train on a canonical file within a time budget, pick the best
epoch on validation, and print the test frame-level NLL next to the published numbers for that
file and two baselines computed on the same file.

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

The file is identified by its content, the number of sequences in each split (``identify_dataset``:
JSB Chorales 229/76/77, Nottingham 694/173/170, MuseData 524/135/124, Piano-midi.de 87/12/25,
the same in the Boulanger-Lewandowski pickles and the TCN .mat files), whatever its name. Published
test NLLs are printed for that file only, each with its source: JSB Chorales and Nottingham from
Bai, Kolter & Koltun (2018), Table 1; for MuseData, Piano-midi.de or any other file none are
printed (one line says so).

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

# Sequences per split (train, valid, test) of the canonical files -> their name.
SPLIT_COUNTS = {
    (229, 76, 77): "JSB Chorales",
    (694, 173, 170): "Nottingham",
    (524, 135, 124): "MuseData",
    (87, 12, 25): "Piano-midi.de",
}

# Published test NLL (frame-level, lower is better) per file, each with its source. Only numbers
# checked against the paper's text: Bai, Kolter & Koltun (2018), "An Empirical Evaluation of
# Generic Convolutional and Recurrent Networks for Sequence Modeling", Table 1 (rows "Music JSB
# Chorales (loss)" and "Music Nottingham (loss)"; columns LSTM, GRU, RNN, TCN).
BAI_2018 = "Bai, Kolter & Koltun 2018, Table 1"
PUBLISHED = {
    "JSB Chorales": {"RNN": (8.91, BAI_2018), "LSTM": (8.45, BAI_2018), "GRU": (8.43, BAI_2018),
                     "TCN": (8.10, BAI_2018)},
    "Nottingham": {"RNN": (4.05, BAI_2018), "LSTM": (3.29, BAI_2018), "GRU": (3.46, BAI_2018),
                   "TCN": (3.07, BAI_2018)},
}

# The vanilla RNN's settings on top of configs/jsb_lstm.yaml (the same as configs/chorales_rnn.yaml).
RNN_OVERRIDES = ["--model.init_args.network.cell=rnn", "--model.init_args.network.nonlinearity=tanh",
                 "--optimizer.init_args.lr=0.002", "--lr_scheduler=null",
                 # its own regularization, chosen on validation like the LSTM's (docs/results.md)
                 "--model.init_args.network.weight_drop=0.5", "--model.init_args.network.recurrent_dropout=0.0"]


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


def identify_dataset(rolls: dict) -> str | None:
    """The canonical file these rolls are (``SPLIT_COUNTS``), by the number of sequences in each
    split; None for any other data."""
    return SPLIT_COUNTS.get(tuple(len(rolls[s]) for s in ("train", "valid", "test")))


def published_lines(dataset: str | None, width: int = 52) -> list[str]:
    """The published test NLLs of that file, one line each with its source; else one line saying
    there are none."""
    if dataset not in PUBLISHED:
        return ["(no published numbers known for this file)"]
    return [f"{model + ' (published, ' + source + ')':<{width}} {nll:>9.2f}"
            for model, (nll, source) in PUBLISHED[dataset].items()]


def baselines(rolls: dict) -> dict[str, float]:
    from seqmodels.music import frequency_baseline, previous_frame_baseline

    return {"frequency": frequency_baseline(rolls["train"], rolls["test"]),
            "previous": previous_frame_baseline(rolls["train"], rolls["test"]),
            "frequency_val": frequency_baseline(rolls["train"], rolls["valid"]),
            "previous_val": previous_frame_baseline(rolls["train"], rolls["valid"])}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    from seqmodels.cli import main as cli_main

    from data_modules.music_formats import load_file

    rolls = load_file(args.path)
    dataset = identify_dataset(rolls)
    counts = "/".join(str(len(rolls[s])) for s in ("train", "valid", "test"))
    base = baselines(rolls)
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

        # on val/loss, which is the music model's val/nll: Lightning refuses a second EarlyStopping
        # on the same metric, and jsb_lstm.yaml has its own on val/nll (the earlier one stops the run)
        callbacks.append(EarlyStopping(monitor="val/loss", mode="min", patience=args.patience))
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
    what = f"identified as {dataset}" if dataset else "not one of the canonical files"
    print(f"\nTest frame-level NLL on {name} ({what}: {counts} sequences per split; lower is better)")
    print(f"{'model':<52} {'test NLL':>9}")
    for line in published_lines(dataset):
        print(line)
    print(f"{'baseline: per-pitch training frequency':<52} {base['frequency']:>9.2f}")
    print(f"{'baseline: per-pitch previous-frame model':<52} {base['previous']:>9.2f}")
    print(f"{'this run: ' + args.model + f' (best epoch {best_epoch}, val {val_nll:.3f})':<52} {test_nll:>9.2f}")
    to_best = clock.minutes.get(best_epoch, float("nan"))
    device = str(cli.model.device)
    print(f"test acc {results['test/acc']:.4f}; {trainer.current_epoch} epochs in {trained / 60:.1f} min "
          f"(budget {args.minutes:g}), the best after {to_best:.1f} min, on {device}; checkpoint {checkpoint.best_model_path}")
    published = {model: nll for model, (nll, _) in PUBLISHED.get(dataset, {}).items()}
    summary = {"model": args.model, "file": name, "dataset": dataset, "published": published, "test_nll": round(test_nll, 4), "val_nll": round(val_nll, 4),
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
