"""Train the Shakespeare config for a wall-clock budget; compare with n-gram baselines.

    python benchmarks/shakespeare.py --minutes 15 --model lstm
    python benchmarks/shakespeare.py --minutes 15 --model rnn --path my.txt --val-fraction 0.1

    python benchmarks/shakespeare.py --minutes 5 --config configs/shakespeare_lstm_gpu.yaml   # one GPU

Prints the validation loss (nats/char: the better of the best checkpoint and the final
weights), add-k character n-gram baselines (orders 1–5, k picked from a small grid on the
same split: a strong baseline), training tokens/s, the time to the first step, the share of
wall time spent on everything that is not a training step (validation, sampling,
diagnostics, checkpoints), the device, precision and peak GPU memory, the time to encode
the corpus from scratch, and as its last line one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROCESS_START = time.perf_counter()

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from ngram import best_ngram_losses  # noqa: E402


class Throughput(Callback):
    """Tokens per second of training steps, the time to the first step, and how much of the
    wall time is not training steps.

    Overhead = wall time from the first step to the end of fit, minus steps × the median
    interval between consecutive step starts (a step, its data and its per-step logging).
    What remains is validation, sampling, diagnostics, checkpoints and epoch starts,
    whichever callback they come from. The median is robust to the intervals that contain them.
    """

    def __init__(self) -> None:
        self.tokens, self.step_time = 0, 0.0
        self.first_step_at = self.end_at = None
        self.intervals: list[float] = []
        self._start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = now
        elif self._start is not None:
            self.intervals.append(now - self._start)
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_time += time.perf_counter() - self._start
        self.tokens += batch[0].numel()

    def on_train_end(self, trainer, pl_module) -> None:
        self.end_at = time.perf_counter()

    def overhead_share(self) -> float:
        """Share of the wall time after the first step that is not a training step."""
        if not self.intervals or self.first_step_at is None:
            return float("nan")
        wall = self.end_at - self.first_step_at
        steady = statistics.median(self.intervals) * (len(self.intervals) + 1)
        return max(0.0, wall - steady) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--model", choices=["lstm", "rnn"], default="lstm")
    parser.add_argument("--path", default=None, help="a text file (default: the embedded Shakespeare)")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--config", action="append", default=None,
                        help="default: configs/shakespeare_<model>.yaml; repeat for overlays (configs/peephole.yaml)")
    parser.add_argument("--max-epochs", type=int, default=None, help="default: the config's")
    args, extra = parser.parse_known_args()
    os.environ.setdefault("WANDB_MODE", "disabled")

    from data_modules.text import CharTextDataModule
    from seqmodels.cli import main as cli_main

    with tempfile.TemporaryDirectory() as cold_cache:  # encoding from nothing
        start = time.perf_counter()
        CharTextDataModule(path=args.path, cache_dir=cold_cache, datasets_cache_dir=cold_cache).prepare()
        encode_seconds = time.perf_counter() - start

    configs = args.config or [str(ROOT / "configs" / f"shakespeare_{args.model}.yaml")]
    f = args.val_fraction
    out_dir = tempfile.mkdtemp(prefix="bench-shakespeare-")
    throughput = Throughput()
    overrides = [
        "fit", *[arg for c in configs for arg in ("--config", c)], f"--trainer.max_time=00:00:{int(args.minutes * 60) // 60:02d}:{int(args.minutes * 60) % 60:02d}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={out_dir}",
        f"--data.init_args.fractions=[{1 - 2 * f}, {f}, {f}]", "--trainer.enable_progress_bar=false",
    ]
    if args.path:
        overrides.append(f"--data.init_args.path={args.path}")
    if args.max_epochs:
        overrides.append(f"--trainer.max_epochs={args.max_epochs}")
    fit_start = time.perf_counter()  # max_time counts the whole fit, validation included
    cli = cli_main(overrides + extra, trainer_defaults={"callbacks": [throughput]})
    train_minutes = (time.perf_counter() - fit_start) / 60
    trainer, dm, model = cli.trainer, cli.datamodule, cli.model
    final = float(trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"])
    best = trainer.checkpoint_callback.best_model_path or None
    best_loss = float(trainer.validate(model, datamodule=dm, ckpt_path=best, verbose=False)[0]["val/loss"]) if best else final
    val_loss = min(final, best_loss)

    ngram = best_ngram_losses(dm.split_ids("train"), dm.split_ids("val"), dm.vocab_size)
    tokens_per_s = throughput.tokens / max(throughput.step_time, 1e-9)
    wall_tokens_per_s = throughput.tokens / max(throughput.end_at - throughput.first_step_at, 1e-9)
    overhead = throughput.overhead_share()
    first_step_s = throughput.first_step_at - PROCESS_START
    device = str(model.device)
    if model.device.type == "cuda":
        host = f"{torch.cuda.get_device_name(model.device)}, torch {torch.__version__}"
        peak_gib = torch.cuda.max_memory_allocated(model.device) / 2 ** 30
    else:
        host = f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
        peak_gib = None
    precision = str(trainer.precision)
    print(f"\nhost: {host} (tokens/s, and so the loss reached in a time budget, depend on it)")
    print(f"device: {device}, precision {precision} (the recurrence runs in float32), "
          f"peak GPU memory {'n/a' if peak_gib is None else f'{peak_gib:.1f} GiB'}")
    print(f"corpus: {args.path or 'embedded Shakespeare'}; train/val chars "
          f"{len(dm.split_ids('train')):,}/{len(dm.split_ids('val')):,}; vocabulary {dm.vocab_size}")
    print(f"encoding from scratch: {encode_seconds:.2f} s")
    print(f"time to the first step: {first_step_s:.1f} s after the process started")
    print(f"{args.model}: {train_minutes:.1f} min, {trainer.current_epoch} epochs, {trainer.global_step} steps, "
          f"{tokens_per_s:,.0f} train tokens/s inside steps, {wall_tokens_per_s:,.0f} over the wall time")
    print(f"not training steps (validation, sampling, diagnostics, checkpoints): {100 * overhead:.1f}% of wall time")
    print(f"{'model':<10} {'val nats/char':>14} {'bits/char':>10}")
    print(f"{args.model:<10} {val_loss:>14.4f} {val_loss / math.log(2):>10.4f}   (final weights {final:.4f}, "
          f"best checkpoint {best_loss:.4f})")
    for n, r in ngram.items():
        print(f"{n + '-gram':<10} {r['loss']:>14.4f} {r['loss'] / math.log(2):>10.4f}   (add-k, k={r['k']})")
    result = {
        "model": args.model, "config": " + ".join(os.path.relpath(c, ROOT) for c in configs), "minutes": args.minutes,
        "val_loss": val_loss, "val_bpc": val_loss / math.log(2), "val_loss_final": final, "val_loss_best": best_loss,
        "ngram": {n: r["loss"] for n, r in ngram.items()}, "tokens_per_s": tokens_per_s,
        "wall_tokens_per_s": wall_tokens_per_s, "overhead_fraction": overhead, "first_step_s": first_step_s,
        "encode_seconds": encode_seconds, "epochs": trainer.current_epoch, "steps": trainer.global_step,
        "train_minutes": train_minutes, "host": host, "device": device, "precision": precision,
        "peak_gpu_gib": peak_gib,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
