"""Train the Shakespeare config for a wall-clock budget; compare with n-gram baselines.

    python benchmarks/shakespeare.py --minutes 15 --model lstm
    python benchmarks/shakespeare.py --minutes 15 --model rnn --path my.txt --val-fraction 0.1

Prints the validation loss (nats/char, of the best checkpoint), add-k character n-gram
baselines (orders 1–5, k picked from a small grid on the same split: a strong baseline),
training tokens/s, the share of step time spent waiting for data, the time to encode the
corpus from scratch, and as its last line one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from ngram import best_ngram_losses  # noqa: E402


class Throughput(Callback):
    """Tokens per second of training steps, and the time between steps (data + overhead)."""

    def __init__(self) -> None:
        self.tokens, self.step_time, self.gap_time = 0, 0.0, 0.0
        self._start = self._end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._end is not None and batch_idx > 0:
            self.gap_time += now - self._end
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end = time.perf_counter()
        self.step_time += self._end - self._start
        self.tokens += batch[0].numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--model", choices=["lstm", "rnn"], default="lstm")
    parser.add_argument("--path", default=None, help="a text file (default: the embedded Shakespeare)")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--config", default=None, help="default: configs/shakespeare_<model>.yaml")
    parser.add_argument("--max-epochs", type=int, default=None, help="default: the config's")
    args, extra = parser.parse_known_args()
    os.environ.setdefault("WANDB_MODE", "disabled")

    from data_modules.text import CharTextDataModule
    from seqmodels.cli import main as cli_main

    with tempfile.TemporaryDirectory() as cold_cache:  # encoding from nothing
        start = time.perf_counter()
        CharTextDataModule(path=args.path, cache_dir=cold_cache).prepare()
        encode_seconds = time.perf_counter() - start

    config = args.config or str(ROOT / "configs" / f"shakespeare_{args.model}.yaml")
    f = args.val_fraction
    out_dir = tempfile.mkdtemp(prefix="bench-shakespeare-")
    throughput = Throughput()
    overrides = [
        "fit", "--config", config, f"--trainer.max_time=00:00:{int(args.minutes * 60) // 60:02d}:{int(args.minutes * 60) % 60:02d}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={out_dir}",
        f"--data.init_args.fractions=[{1 - 2 * f}, {f}, {f}]", "--trainer.enable_progress_bar=false",
    ]
    if args.path:
        overrides.append(f"--data.init_args.path={args.path}")
    if args.max_epochs:
        overrides.append(f"--trainer.max_epochs={args.max_epochs}")
    start = time.perf_counter()  # max_time counts the whole fit, validation included
    cli = cli_main(overrides + extra, trainer_defaults={"callbacks": [throughput]})
    train_minutes = (time.perf_counter() - start) / 60
    trainer, dm = cli.trainer, cli.datamodule
    best = trainer.checkpoint_callback.best_model_path or None
    val = trainer.validate(cli.model, datamodule=dm, ckpt_path=best, verbose=False)[0]
    val_loss = float(val["val/loss"])

    ngram = best_ngram_losses(dm.split_ids("train"), dm.split_ids("val"), dm.vocab_size)
    tokens_per_s = throughput.tokens / max(throughput.step_time, 1e-9)
    data_share = throughput.gap_time / max(throughput.step_time + throughput.gap_time, 1e-9)

    host = f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
    print(f"\nhost: {host} (tokens/s, and so the loss reached in a time budget, depend on it)")
    print(f"corpus: {args.path or 'embedded Shakespeare'}; train/val chars "
          f"{len(dm.split_ids('train')):,}/{len(dm.split_ids('val')):,}; vocabulary {dm.vocab_size}")
    print(f"encoding from scratch: {encode_seconds:.2f} s")
    print(f"{args.model}: {train_minutes:.1f} min, {trainer.current_epoch} epochs, {trainer.global_step} steps, "
          f"{tokens_per_s:,.0f} train tokens/s, time between steps (data + logging) {100 * data_share:.1f}% of step time")
    print(f"{'model':<10} {'val nats/char':>14} {'bits/char':>10}")
    print(f"{args.model:<10} {val_loss:>14.4f} {val_loss / math.log(2):>10.4f}")
    for n, r in ngram.items():
        print(f"{n + '-gram':<10} {r['loss']:>14.4f} {r['loss'] / math.log(2):>10.4f}   (add-k, k={r['k']})")
    result = {
        "model": args.model, "minutes": args.minutes, "val_loss": val_loss, "val_bpc": val_loss / math.log(2),
        "ngram": {n: r["loss"] for n, r in ngram.items()}, "tokens_per_s": tokens_per_s,
        "data_wait_fraction": data_share, "encode_seconds": encode_seconds, "epochs": trainer.current_epoch,
        "steps": trainer.global_step, "train_minutes": train_minutes, "host": host,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
