"""Time every persistent launch plan of the GPU kernels of impl triton, to tune ``gpu.plan``.

    python benchmarks/triton_plans.py                    # the GPU sizes, the LSTM, the 8 widest plans
    python benchmarks/triton_plans.py --size 64 256 64 512 --cells lstm
    python benchmarks/triton_plans.py --list             # the plans only (no GPU needed)

For each cell and size (B, T, I, H), one training step (forward + backward of a 1-layer
``RecurrentStack(impl="triton")``, loss = output.sum()) under each plan of
``gpu.persistent_plans`` (blocks of BB rows x BH units, 4 or 8 warps, at most one program per
SM; the ``--top`` plans with the most programs, since every plan compiles its own kernels):
the median of ``--repeats`` timed steps after two untimed ones (the first compiles). The
plan ``gpu.plan`` picks is marked ``*``; the last line is one JSON object with every timing.
TF32 as in benchmarks/cells.py (on; ``--no-tf32`` off).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cells import SIZES  # noqa: E402


def widest(B: int, H: int, sms: int, top: int) -> list:
    """The ``top`` plans with the most programs (ties: the taller batch block, 4 warps first)."""
    from seqmodels.bptt import gpu

    plans = gpu.persistent_plans(B, H, sms)
    return sorted(plans, key=lambda p: (-p.grid(B, H)[0] * p.grid(B, H)[1], -p.BB, p.warps))[:top]


def time_plans(cell: str, B: int, T: int, I: int, H: int, repeats: int, sms: int, top: int) -> list[dict]:
    import torch

    from seqmodels.bptt import gpu
    from seqmodels.recurrent import RecurrentStack

    name, options = ("lstm", dict(peephole=True)) if cell == "peephole" else (cell, {})
    torch.manual_seed(0)
    stack = RecurrentStack(name, I, H, impl="triton", **options).cuda()
    x = torch.randn(B, T, I, device="cuda")
    default = gpu.plan(B, H, sms)
    rows = []
    for p in widest(B, H, sms, top):
        times = []
        with mock.patch.object(gpu, "plan", lambda *a, p=p: p):
            for r in range(repeats + 2):
                stack.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                stack(x)[0].sum().backward()
                torch.cuda.synchronize()
                if r >= 2:
                    times.append(time.perf_counter() - t0)
        rows.append(dict(cell=cell, B=B, T=T, I=I, H=H, BB=p.BB, BH=p.BH, warps=p.warps,
                         ms=1000 * statistics.median(times), default=p == default))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="gpu", choices=sorted(SIZES))
    parser.add_argument("--size", type=int, nargs=4, action="append", metavar=("B", "T", "I", "H"))
    parser.add_argument("--cells", default="lstm", help="any of lstm, rnn, gru, peephole")
    parser.add_argument("--top", type=int, default=8, help="time the plans with the most programs, this many")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sms", type=int, default=None, help="multiprocessors (default: this GPU's; --list: 132)")
    parser.add_argument("--list", action="store_true", help="print the plans, time nothing")
    parser.add_argument("--no-tf32", action="store_true")
    args = parser.parse_args()
    from seqmodels.bptt import gpu

    sizes = args.size or SIZES[args.sizes]
    if args.list:
        sms = args.sms or 132
        for B, T, I, H in sizes:
            default = gpu.plan(B, H, sms)
            plans = widest(B, H, sms, args.top)
            print(f"B={B} H={H} on {sms} SMs: {len(plans)} plans timed; default BB={default.BB} BH={default.BH} "
                  f"warps={default.warps} ({'persistent' if default.persistent else 'one launch per step'})")
            for p in plans:
                print(f"  BB={p.BB:3} BH={p.BH:2} warps={p.warps} programs={p.grid(B, H)[0] * p.grid(B, H)[1]}")
        return
    import torch

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.no_tf32
    sms = args.sms or torch.cuda.get_device_properties(0).multi_processor_count
    print(f"gpu: {torch.cuda.get_device_name()}, {sms} SMs, torch {torch.__version__}", flush=True)
    results = []
    for cell in args.cells.split(","):
        for B, T, I, H in sizes:
            rows = sorted(time_plans(cell, B, T, I, H, args.repeats, sms, args.top), key=lambda r: r["ms"])
            for row in rows:
                print(f"{cell:8} ({B}, {T}, {I}, {H})  BB={row['BB']:3} BH={row['BH']:2} warps={row['warps']}  "
                      f"{row['ms']:8.2f} ms{'  *' if row['default'] else ''}", flush=True)
            results += rows
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
