"""What each extra of seqmodels.nn costs in speed: training tokens/s of one 2-layer module with
each extra (peepholes, every recurrent regularizer) against the same module without it and
against torch.nn's, in interleaved rounds in one process (medians of per-round ratios).

    python benchmarks/extras.py                     # LSTM, (B, T, I, H) = (32, 100, 64, 256)
    python benchmarks/extras.py --cell gru --size 16 64 88 128 --json

Each row runs ``impl: auto`` (what a user gets): the backend it chose is printed beside it.
Keep torch's default thread count; run one benchmark at a time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EXTRAS = {
    "none": {},
    "peephole": {"peephole": True},
    "recurrent_dropout": {"recurrent_dropout": 0.25},
    "zoneout_h": {"zoneout_h": 0.1},
    "zoneout_c": {"zoneout_c": 0.1},
    "weight_drop": {"weight_drop": 0.3},
}


def main() -> None:
    import torch

    import seqmodels.nn as snn
    from benchmarks.cells import host
    from seqmodels.registry import CELLS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", default="lstm", choices=("rnn", "lstm", "gru"))
    parser.add_argument("--size", type=int, nargs=4, default=(32, 100, 64, 256), metavar=("B", "T", "I", "H"))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args()
    B, T, I, H = args.size
    kind = CELLS[args.cell]
    module = {"rnn": snn.RNN, "lstm": snn.LSTM, "gru": snn.GRU}[args.cell]
    extras = {name: options for name, options in EXTRAS.items()
              if all(k in kind.options or k in ("recurrent_dropout", "zoneout_h", "weight_drop") or
                     (k == "zoneout_c" and "c" in kind.state) for k in options)}
    torch.manual_seed(0)
    x = torch.randn(T, B, I)
    models = {"torch.nn": getattr(torch.nn, module.__name__)(I, H, 2)}
    models.update({name: module(I, H, 2, **options) for name, options in extras.items()})

    def step(model) -> float:
        for p in model.parameters():
            p.grad = None
        t0 = time.perf_counter()
        out, _ = model(x)
        out.sum().backward()
        return time.perf_counter() - t0

    for model in models.values():  # warm-up; auto measures its candidates here
        step(model)
        step(model)
    times = {name: [] for name in models}
    names = list(models)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(step(models[name]))
    machine = host()
    print(f"host: {machine['cpu']}, ISA {machine['isa']}, {machine['threads']} threads, torch {machine['torch']}; "
          f"{args.cell} 2 layers, (B, T, I, H) = {tuple(args.size)}, training")
    print(f"{'extra':18} {'backend':10} {'tok/s':>9} {'x none':>7} {'x torch.nn':>10}")
    rows = []
    for name in names:
        backend = "" if name == "torch.nn" else next(iter(models[name].backends.values())).backend
        row = {"extra": name, "backend": backend, "tokens_per_s": B * T / statistics.median(times[name]),
               "ratio_vs_none": statistics.median(a / b for a, b in zip(times["none"], times[name])),
               "ratio_vs_torch": statistics.median(a / b for a, b in zip(times["torch.nn"], times[name]))}
        rows.append(row)
        print(f"{name:18} {backend:10} {row['tokens_per_s']:9.0f} {row['ratio_vs_none']:7.2f} "
              f"{row['ratio_vs_torch']:10.2f}")
    if args.json:
        print(json.dumps({"host": machine, "cell": args.cell, "size": list(args.size), "rows": rows}))


if __name__ == "__main__":
    main()
