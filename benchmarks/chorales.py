"""Polyphonic music benchmark: train on a canonical file within a time budget, pick the best
epoch on validation, and print the test frame-level NLL next to the published numbers for that
file and two baselines computed on the same file.

    python benchmarks/chorales.py --path JSB_Chorales.mat --model lstm --minutes 20
    python benchmarks/chorales.py --path JSB_Chorales.mat --model rnn --minutes 20
    python benchmarks/chorales.py --path JSB_Chorales.mat --model lstm --minutes 20 --patience 50

The whole table, every model x every file x seeds, one fresh process per run, within a budget:

    python benchmarks/chorales.py --table --path JSB_Chorales.mat MuseData.mat Piano_midi.mat \
        --models lstm,gru,rnn,rru --seeds 1234,1,2 --minutes 20 [--budget 8] [--out runs/chorales-table]

It appends each run's JSON line to ``<out>/runs.jsonl`` (run again: the runs already there are
not run again, so an interrupted table resumes), then prints and writes, from every run logged
there for these files and models (other seeds of an earlier command too), ``<out>/table.md`` (each
model's mean test NLL over the seeds with the min-max range, the published rows with their
sources, the baselines) and ``<out>/nll.png`` (test NLL per model and file, each seed a point).
A logged run counts for a file given, in the table and as done, if it ran on a file of the same
name, in any folder (runs logged by other commands or machines). ``--no-run`` only writes the
table and the plot from what ``runs.jsonl`` holds; the files need not be here. ``--budget H``
caps the whole table at H hours: the runs left share it (at most ``--minutes`` each, less where
needed).

``--patience N`` ends the run N epochs after the best validation NLL (EarlyStopping), so its
wall time says how long the model needs, not how long it was allowed. Either way the run
reports the minutes to its best epoch.

Training goes through the CLI with ``configs/jsb_lstm.yaml`` (``--model rnn`` swaps in the
vanilla RNN settings of ``RNN_OVERRIDES``; ``--model gru`` and ``rru`` use ``jsb_gru.yaml`` and
``jsb_rru.yaml``; on MuseData and Piano-midi.de the LSTM adds the overlay ``musedata_lstm.yaml`` or
``piano_midi_lstm.yaml``: ``FILE_CONFIGS``;
``--config`` replaces them all), so the run is logged like any other (W&B, checkpoints under runs/). The NLL is the published one: Σ over sequences of the BCE summed over
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
import subprocess
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
# The targets of the table (``--table``), the best published results with the same output (a
# Bernoulli per pitch, NLL per frame) and at most 5M parameters: the tuned results in the README
# of the paper's code (Zakovskis et al. 2021, "Gates are not what you need in RNNs",
# arXiv:2108.00527; github.com/LUMII-Syslab/RRU at bd4c1d6, "Results", the rows "Music ... (NLL)").
RRU_2021 = "Zakovskis et al. 2021, \"Gates are not what you need in RNNs\", README of LUMII-Syslab/RRU (tuned)"
TARGETS = {
    "RRU": {"JSB Chorales": 7.72, "MuseData": 7.03, "Piano-midi.de": 7.38, "Nottingham": 2.92},
    "Mogrifier LSTM (RRU paper)": {"JSB Chorales": 8.18, "MuseData": 7.22, "Piano-midi.de": 7.52, "Nottingham": 3.28},
    "LSTM (RRU paper)": {"JSB Chorales": 8.33, "MuseData": 7.24, "Piano-midi.de": 7.54, "Nottingham": 3.25},
    "GRU (RRU paper)": {"JSB Chorales": 8.20, "MuseData": 7.31, "Piano-midi.de": 7.58, "Nottingham": 3.22},
}

# The RRU numbers are not on Bai et al.'s protocol (docs/results.md, "What the RRU numbers measure").
RRU_PROTOCOL = ("RRU's protocol (its mm_main.py): 200-frame windows from the zero state, the mean of "
                "per-window mean NLLs; its search kept the best test NLL (its objective returns it).")

MODELS = ("lstm", "gru", "rnn", "rru")
# each model's config (the vanilla RNN: jsb_lstm.yaml with RNN_OVERRIDES)
CONFIGS = {"gru": "jsb_gru.yaml", "rru": "jsb_rru.yaml"}
# A file's own overlay, given after the model's config where the file is identified as that
# dataset (and no --config is given): chosen on that file's validation split (docs/results.md).
FILE_CONFIGS = {("lstm", "MuseData"): "musedata_lstm.yaml", ("lstm", "Piano-midi.de"): "piano_midi_lstm.yaml"}

# The vanilla RNN's settings on top of configs/jsb_lstm.yaml (the same as configs/chorales_rnn.yaml).
RNN_OVERRIDES = ["--model.init_args.network.cell=rnn", "--model.init_args.network.nonlinearity=tanh",
                 "--optimizer.init_args.lr=0.002", "--lr_scheduler=null",
                 # its own regularization, chosen on validation like the LSTM's (docs/results.md)
                 "--model.init_args.network.weight_drop=0.5", "--model.init_args.network.recurrent_dropout=0.0"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", required=True, nargs="+",
                        help="a Boulanger-Lewandowski pickle or TCN .mat file (with --table: one or more)")
    parser.add_argument("--model", choices=MODELS, default="lstm")
    parser.add_argument("--table", action="store_true", help="every --models x every --path x --seeds (module docstring)")
    parser.add_argument("--models", default=",".join(MODELS), help="with --table: comma-separated, from " + ",".join(MODELS))
    parser.add_argument("--seeds", default="1234,1,2", help="with --table: comma-separated seeds")
    parser.add_argument("--budget", type=float, default=None, help="with --table: hours for the whole table")
    parser.add_argument("--no-run", action="store_true",
                        help="with --table: run nothing, write the table and plot from the runs logged in --out")
    parser.add_argument("--out", default="runs/chorales-table", help="with --table: where runs.jsonl, table.md, nll.png go")
    parser.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    parser.add_argument("--config", default=None, help="default: configs/jsb_gru.yaml for --model gru, jsb_rru.yaml for rru, else jsb_lstm.yaml, and the file's overlay of FILE_CONFIGS")
    parser.add_argument("--seed", type=int, default=None, help="seed_everything (default: the config's)")
    parser.add_argument("--patience", type=int, default=None,
                        help="stop N epochs after the best val/nll (default: train for the whole budget)")
    parser.add_argument("overrides", nargs="*", help="more CLI overrides, e.g. --model.init_args.network.hidden_size=128")
    args, extra = parser.parse_known_args(argv)
    args.overrides += extra  # CLI overrides start with --
    if args.table:
        args.models = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in args.models if m not in MODELS]
        if unknown or not args.models:
            parser.error(f"--models {','.join(unknown) or '(empty)'}: choose from {','.join(MODELS)}")
        try:
            args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            parser.error(f"--seeds {args.seeds!r}: give whole numbers separated by commas, e.g. 1234,1,2")
        if not args.seeds:
            parser.error("--seeds: give at least one seed, e.g. 1234,1,2")
        if args.budget is not None and args.budget <= 0:
            parser.error(f"--budget {args.budget}: give the hours for the whole table, > 0")
        missing = [p for p in args.path if not Path(p).is_file()]
        if missing and not args.no_run:  # --no-run reads only runs.jsonl: the files may be elsewhere
            parser.error(f"--path {missing[0]}: no such file (a canonical .mat or pickle file)")
    elif len(args.path) > 1:
        parser.error("one --path per run; several files make a table: add --table")
    else:
        args.path = args.path[0]
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
    if args.table:
        return run_table(args)
    os.environ.setdefault("WANDB_SILENT", "true")
    from seqmodels.cli import main as cli_main

    from data_modules.music_formats import load_file
    from seqmodels.music import windowed_nll

    rolls = load_file(args.path)
    dataset = identify_dataset(rolls)
    counts = "/".join(str(len(rolls[s])) for s in ("train", "valid", "test"))
    base = baselines(rolls)
    configs = config_files(args, dataset)
    cli_args = cli_arguments(args, configs)
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
    # the same weights on the protocol of the RRU paper's numbers (seqmodels.music.windowed_nll)
    test_nll_rru = windowed_nll(cli.model.eval(), rolls["test"])
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
    print(f"{'this run on the RRU paper protocol (200-frame windows)':<52} {test_nll_rru:>9.2f}")
    to_best = clock.minutes.get(best_epoch, float("nan"))
    device = str(cli.model.device)
    print(f"test acc {results['test/acc']:.4f}; {trainer.current_epoch} epochs in {trained / 60:.1f} min "
          f"(budget {args.minutes:g}), the best after {to_best:.1f} min, on {device}; checkpoint {checkpoint.best_model_path}")
    published = {model: nll for model, (nll, _) in PUBLISHED.get(dataset, {}).items()}
    summary = {"model": args.model, "seed": args.seed, "file": name, "configs": [Path(c).name for c in configs], "dataset": dataset, "published": published, "test_nll": round(test_nll, 4), "test_nll_rru": round(test_nll_rru, 4), "val_nll": round(val_nll, 4),
               "baseline_frequency": round(base["frequency"], 4), "baseline_previous": round(base["previous"], 4),
               "minutes": round(total / 60, 2), "train_minutes": round(trained / 60, 2),
               "epochs": trainer.current_epoch, "best_epoch": best_epoch, "minutes_to_best": round(to_best, 2),
               "device": device, "host": _host(device), "precision": str(trainer.precision),
               "test_acc": round(float(results["test/acc"]), 4)}
    print(json.dumps(summary))
    return summary


def config_files(args: argparse.Namespace, dataset: str | None) -> list[str]:
    """The configs of a run, in order: ``--config``, or the model's config and the file's overlay."""
    if args.config:
        return [args.config]
    overlay = FILE_CONFIGS.get((args.model, dataset))
    return [str(ROOT / "configs" / name) for name in (CONFIGS.get(args.model, "jsb_lstm.yaml"), overlay) if name]


def cli_arguments(args: argparse.Namespace, configs: list[str]) -> list[str]:
    """The CLI's arguments for one run: its configs, the file, the time budget, the seed."""
    seconds = int(round(args.minutes * 60))
    cli_args = ["fit", *(a for config in configs for a in ("--config", config)), f"--data.path={args.path}",
                f"--trainer.max_time=00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}",
                "--trainer.max_epochs=-1", "--trainer.enable_progress_bar=false"]
    if args.model == "rnn":
        cli_args += RNN_OVERRIDES
    if args.seed is not None:
        cli_args.append(f"--seed_everything={args.seed}")
    return cli_args + args.overrides


def _host(device: str) -> str:
    """What ran it, for the table: the GPU, or the CPU model, torch's ISA level and threads."""
    from benchmarks.cells import host

    info = host("cuda" if device.startswith("cuda") else "cpu")
    threads = f"{info['threads']} thread" + ("s" if info["threads"] != 1 else "")
    return info.get("gpu") or f"{info['cpu']}, {info['isa']}, {threads}"


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



# ---- the whole table (--table) ------------------------------------------------------------
def _run_key(path: str, model: str, seed: int) -> tuple:
    # a file is known by its name, as in the table: a run logged on another machine counts as done
    return Path(path).name, model, seed


def read_runs(path: Path) -> list[dict]:
    """The runs of ``runs.jsonl`` (one JSON object a line; a torn last line is skipped)."""
    if not path.is_file():
        return []
    runs = []
    for line in path.read_text().splitlines():
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return runs


def run_table(args: argparse.Namespace) -> dict:
    """Every model x file x seed not yet in ``<out>/runs.jsonl``, each in a fresh process of this
    script, then the table and the plot from all the runs there."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    done = {_run_key(r["path"], r["model"], r["seed"]) for r in read_runs(log)}
    if log.is_file() and not log.read_bytes().endswith(b"\n"):
        with log.open("a") as f:  # a line torn by an interrupted write stays alone on its line
            f.write("\n")
    plan = [(str(Path(p).resolve()), m, s) for p in args.path for m in args.models for s in args.seeds]
    missing = [run for run in plan if _run_key(*run) not in done]
    todo = [] if args.no_run else missing
    minutes = args.minutes
    if args.budget is not None and todo:
        # a run takes its training budget plus ~1 min (start, best-checkpoint test, baselines)
        minutes = min(minutes, max(0.1, args.budget * 60 / len(todo) - 1))
    print(f"{len(plan)} runs ({len(args.models)} models x {len(args.path)} files x {len(args.seeds)} seeds), "
          f"{len(plan) - len(missing)} already in {log}; " + (
              f"{len(missing)} not run (--no-run)" if args.no_run else
              f"{len(todo)} to run, {minutes:.1f} min of training each (about {len(todo) * (minutes + 1) / 60:.1f} h)"),
          flush=True)
    for k, (path, model, seed) in enumerate(todo, 1):
        command = [sys.executable, str(Path(__file__).resolve()), "--path", path, "--model", model,
                   "--seed", str(seed), "--minutes", f"{minutes:g}", *args.overrides]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
            why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"[{k}/{len(todo)}] {model} on {Path(path).name}, seed {seed}: FAILED ({why}); "
                  f"command: {' '.join(command)}", flush=True)
            continue
        result = {**json.loads(lines[-1]), "path": path, "seed": seed}
        with log.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"[{k}/{len(todo)}] {model} on {result['dataset'] or result['file']}, seed {seed}: test NLL "
              f"{result['test_nll']:.3f} (val {result['val_nll']:.3f}), {(time.perf_counter() - start) / 60:.1f} min",
              flush=True)
    # every logged run of these files and models, also those of other seeds (an earlier command's)
    # and those of a file of the same name in another folder (runs logged on another machine)
    names, models = {Path(path).name for path, _, _ in plan}, set(args.models)
    runs = [r for r in read_runs(log) if Path(r["path"]).name in names and r["model"] in models]
    table = markdown_table(runs)
    (out / "table.md").write_text(table)
    print("\n" + table)
    if runs:
        plot_table(runs, out / "nll.png")
        print(f"written: {out / 'table.md'}, {out / 'nll.png'}, {log}")
    return {"runs": len(runs), "table": str(out / "table.md")}


def _column(run: dict) -> str:
    return run.get("dataset") or run["file"]


def markdown_table(runs: list[dict]) -> str:
    """Test NLL per model (rows) and file (columns): each model's mean over its seeds with the
    min-max range, then the published rows with their sources, then the two baselines."""
    columns = list(dict.fromkeys(_column(r) for r in runs))
    if not columns:
        return "(no runs yet)\n"
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    by_model: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        by_model.setdefault(r["model"], {}).setdefault(_column(r), []).append(r["test_nll"])
    for model, cells in by_model.items():
        seeds = max(len(v) for v in cells.values())
        row = []
        for c in columns:
            v = cells.get(c, [])
            mean = sum(v) / len(v) if v else None
            spread = f" ({min(v):.2f}–{max(v):.2f})" if len(v) > 1 else ""
            count = f" ({len(v)} seed{'s' * (len(v) > 1)})" if len(v) != seeds else ""
            row.append("–" if mean is None else f"**{mean:.2f}**{spread}{count}")
        label = f"seqmodels {model.upper()}, this table ({seeds} seed{'s' * (seeds > 1)}"
        label += ", fewer where noted)" if any(len(v) != seeds for v in cells.values()) else ")"
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    for model in by_model:  # the same runs on the RRU paper's protocol, where measured
        rru = {c: [r["test_nll_rru"] for r in runs if r["model"] == model and _column(r) == c and "test_nll_rru" in r]
               for c in columns}
        if any(rru.values()):
            lines.append(f"| seqmodels {model.upper()}, the same runs on RRU's protocol [3] | " + " | ".join(
                f"{sum(v) / len(v):.2f}" + (f" ({len(v)} seed{'s' * (len(v) > 1)})" if v else "") if v else "–"
                for v in rru.values()) + " |")
    sources = []
    for label, numbers in TARGETS.items():
        if any(c in numbers for c in columns):
            lines.append(f"| {label} [1] | " + " | ".join(f"{numbers[c]:.2f}" if c in numbers else "–" for c in columns) + " |")
            sources = [f"[1] {RRU_2021}"]
    labels = list(dict.fromkeys(label for c in columns for label in PUBLISHED.get(c, {})))
    for label in labels:
        cells = [f"{PUBLISHED[c][label][0]:.2f}" if label in PUBLISHED.get(c, {}) else "–" for c in columns]
        lines.append(f"| {label} (Bai et al.) [2] | " + " | ".join(cells) + " |")
    if labels:
        sources.append(f"[2] {BAI_2018}")
    for key, label in (("baseline_frequency", "baseline: per-pitch training frequency"),
                       ("baseline_previous", "baseline: per-pitch previous-frame model")):
        first = {c: r[key] for r in reversed(runs) for c in [_column(r)]}
        lines.append(f"| {label} | " + " | ".join(f"{first[c]:.2f}" if c in first else "–" for c in columns) + " |")
    hosts = sorted({r.get("host") or r.get("device", "?") for r in runs})
    notes = [f"Test frame-level NLL (lower is better); mean over seeds (min–max); on {'; '.join(hosts)}."] + sources
    if any("test_nll_rru" in r for r in runs):
        notes.append("[3] " + RRU_PROTOCOL)
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def plot_table(runs: list[dict], path: Path) -> Path:
    """One panel per file: each model's test NLL per seed (points) and their mean (a bar), with
    the RRU target and the TCN as dashed lines where published."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(dict.fromkeys(_column(r) for r in runs))
    models = list(dict.fromkeys(r["model"] for r in runs))
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns) + 0.5, 3.4), squeeze=False)
    for ax, column in zip(axes[0], columns):
        for x, model in enumerate(models):
            v = [r["test_nll"] for r in runs if _column(r) == column and r["model"] == model]
            if not v:
                continue
            ax.bar(x, sum(v) / len(v), width=0.6, color=f"C{x}", alpha=0.35)
            ax.scatter([x + 0.12 * (i - (len(v) - 1) / 2) for i in range(len(v))], v, color=f"C{x}", zorder=3, s=18)
        references = []
        for label, linestyle in (("RRU", "--"), ("TCN", ":")):
            nll = TARGETS.get(label, {}).get(column) or PUBLISHED.get(column, {}).get(label, (None,))[0]
            if nll is not None:
                ax.axhline(nll, color="k", linestyle=linestyle, linewidth=1, label=f"{label} {nll:.2f} (published)")
                references.append(nll)
        values = [r["test_nll"] for r in runs if _column(r) == column] + references
        ax.set_ylim(min(values) - 0.3, max(values) + 0.3)  # the differences, not the bars' height from 0
        ax.set_xticks(range(len(models)), [m.upper() for m in models])
        ax.set_title(column)
        ax.set_ylabel("test NLL per frame")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("seqmodels on the canonical music files: each point one seed, bars the mean", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
