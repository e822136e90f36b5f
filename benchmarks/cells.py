"""Speed and memory of the recurrent implementations against torch.nn.RNN / torch.nn.LSTM.

    python benchmarks/cells.py                      # full sizes, RNN and LSTM, table
    python benchmarks/cells.py --sizes small --repeats 5 --cells lstm
    python benchmarks/cells.py --json               # last line: {"results": [...]}
    python benchmarks/cells.py --device cuda        # GPU sizes, RNN, LSTM, peephole LSTM, GRU vs cuDNN
    python benchmarks/cells.py --cells lstm_peephole,gru  # any cell of the registry, or a variant
    python benchmarks/cells.py --bidirectional      # seqmodels.nn's bidirectional layer vs torch.nn's

The cells are those of the registry (``seqmodels.registry.CELLS``), each variant named
``<cell>_<option>`` (``rnn_relu``, ``lstm_peephole``); the rows are the backends of
``seqmodels.backends`` that run the cell on the device (on a CPU: autograd, cpp, torch; on a
GPU: autograd, reference, triton (experimental), torch).

For every cell and size (B, T, I, H), one fresh subprocess times, in interleaved rounds (the
order rotates every round), each implementation of ``RecurrentStack`` (1 layer) and the real
torch module (row ``nn``) on identical weights and inputs:
    training   forward + backward over the whole sequence, loss = output.sum(), x without grad
    inference  forward under torch.no_grad()
tokens/s = B*T / seconds, the median over the rounds (after warm-up); ratio_vs_native = the
median over rounds of (torch module's time / this implementation's time) in the same round,
so > 1 means faster than torch.nn.RNN / nn.LSTM. The torch module itself is the row
``impl = "nn"`` (ratio 1 by definition); ``torch`` is our stack calling the same kernels.

Peak memory (``peak_mem_mb``): in another fresh subprocess per (cell, size, impl), the increase
of the process's peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``) during one
training step, over the peak after building the model and the input and running one
inference pass. It counts everything the step touches (saved activations, gradients, scratch
buffers, allocator slack), measured by the OS, not by torch.

On a GPU (``--device cuda``) the same rounds run with a synchronize around every timed call,
TF32 allowed for cuDNN and for the kernels alike (torch's cuDNN default; ``--no-tf32`` for
exact float32 everywhere), and peak memory is the increase of
``torch.cuda.max_memory_allocated`` during one training step, in the timing process. The
A variant without a torch twin (the peephole LSTM) has as its ``nn`` row the twin of the cell's
default options (cuDNN's plain LSTM of the same size), the target it is compared with; a cell
with no torch twin at all (the RRU) has torch.nn.LSTM of the same size, so its ratios are its
cost against the LSTM's.
``reference`` is the plain-torch reference loop, to show what the kernels replace.

The first line names the host: the CPU model, torch's ISA level (AVX2, AVX512, ...) and the
thread count; after each size, the implementation ``impl: auto`` would train with here: what
its measurement would pick from these timings among ``backends.candidates``
(``seqmodels.autotune.select``) and what ``autotune: false`` takes (the first candidate).

Keep torch's default thread count; run one benchmark at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = {
    "full": [(32, 100, 64, 256), (64, 256, 64, 512), (16, 64, 88, 128)],
    "small": [(16, 64, 88, 128)],
    "tiny": [(4, 16, 8, 16)],
    "gpu": [(64, 256, 64, 512), (256, 256, 128, 1024), (32, 100, 64, 256)],
}
IMPLS = {"cpu": ("autograd", "cpp", "torch"), "cuda": ("autograd", "reference", "triton", "torch")}
REFERENCE = "nn"  # the torch.nn module itself
BIDIRECTIONAL = False  # --bidirectional: seqmodels.nn's module (both directions) against torch.nn's


def variants() -> dict[str, tuple[str, dict]]:
    """Every cell of the registry and each variant, by label: ``lstm``, ``lstm_peephole``, ..."""
    from seqmodels.registry import CELLS

    return {"_".join([name, *(v if isinstance(v, str) else k for k, v in variant.items())]): (name, variant)
            for name, kind in CELLS.items() for variant in kind.all_variants()}


def build(cell: str, impl: str, B: int, T: int, I: int, H: int, device: str = "cpu"):
    """The model for ``impl`` (or the torch module), on weights from one fixed seed, and x. A
    variant without a torch twin gets the twin of its cell's default options as its module."""
    import torch

    from seqmodels.recurrent import RecurrentStack
    from seqmodels.registry import CELLS

    torch.manual_seed(0)
    name, options = variants()[cell]
    kind = CELLS[name]
    twin = kind.torch_twin({**kind.options, **options})
    if impl == REFERENCE and twin is None:
        options, twin = {}, kind.torch_twin(kind.options)
    if impl == REFERENCE and twin is None:  # a cell unlike any of torch's (the RRU): nn.LSTM's cost
        name, options, twin = "lstm", {}, CELLS["lstm"].torch_twin(CELLS["lstm"].options)
    if BIDIRECTIONAL:
        import seqmodels.nn as snn

        module = {"rnn": snn.RNN, "lstm": snn.LSTM, "gru": snn.GRU}[name]
        stack = module(I, H, 1, batch_first=True, bidirectional=True, impl="torch" if impl == REFERENCE else impl,
                       **options).to(device)
    else:
        stack = RecurrentStack(name, I, H, num_layers=1, impl="torch" if impl == REFERENCE else impl,
                               **options).to(device)
    x = torch.randn(B, T, I, device=device)
    if impl != REFERENCE:
        return stack, x
    module, kwargs = twin
    ref = module(I, H, batch_first=True, bidirectional=BIDIRECTIONAL, **kwargs)
    ref.load_state_dict(stack.state_dict() if BIDIRECTIONAL else stack.torch_state_dict())
    return ref.to(device), x


def train_step(model, x) -> None:
    for p in model.parameters():
        p.grad = None
    out, _ = model(x)
    out.sum().backward()


def infer_step(model, x) -> None:
    import torch

    with torch.no_grad():
        model(x)


def timed(fn, *args) -> float:
    import torch

    cuda = args[-1].is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*args)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def gpu_peak_mb(model, x) -> float:
    """Increase of torch.cuda.max_memory_allocated during one training step (MB)."""
    import torch

    infer_step(model, x)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    train_step(model, x)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def impls_for(cell: str, device: str) -> tuple[str, ...]:
    """The backends of this device's rows that can run the cell (the registry says)."""
    from seqmodels import backends

    stack, _ = build(cell, "autograd", 1, 1, 1, 1)
    runnable = backends.runnable(stack.kind, stack.first_cell())
    return tuple(n for n in IMPLS[device] if n in runnable)


def time_config(cell: str, B: int, T: int, I: int, H: int, repeats: int, warmup: int, device: str = "cpu") -> dict:
    """Interleaved rounds over the torch module and every impl; medians of times and ratios."""
    names = (REFERENCE, *impls_for(cell, device))
    models = {n: build(cell, n, B, T, I, H, device) for n in names}
    for n in names:
        for _ in range(warmup):
            train_step(*models[n])
            infer_step(*models[n])
    train = {n: [] for n in names}
    infer = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            train[n].append(timed(train_step, *models[n]))
            infer[n].append(timed(infer_step, *models[n]))
    rows = []
    for n in names:
        row = {
            "cell": cell, "impl": n, "B": B, "T": T, "I": I, "H": H,
            "train_tokens_per_s": B * T / statistics.median(train[n]),
            "train_ratio_vs_native": statistics.median(
                a / b for a, b in zip(train[REFERENCE], train[n])),
            "infer_tokens_per_s": B * T / statistics.median(infer[n]),
            "infer_ratio_vs_native": statistics.median(
                a / b for a, b in zip(infer[REFERENCE], infer[n])),
            "train_ms": 1000 * statistics.median(train[n]),
            "infer_ms": 1000 * statistics.median(infer[n]),
        }
        if device == "cuda":
            row["peak_mem_mb"] = gpu_peak_mb(*models[n])
        rows.append(row)
    return {"rows": rows}


def peak_memory(cell: str, impl: str, B: int, T: int, I: int, H: int) -> float:
    """Peak-RSS increase (MB) of one training step in this (fresh) process; see module doc."""
    model, x = build(cell, impl, B, T, I, H)
    infer_step(model, x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train_step(model, x)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024.0  # ru_maxrss is in KiB on Linux


def host(device: str = "cpu") -> dict:
    """The CPU model, torch's ISA level and thread count; on CUDA the GPU and the versions of
    CUDA, cuDNN and Triton too."""
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": model, "isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}
    if device == "cuda":
        import triton

        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    triton=triton.__version__, tf32=torch.backends.cuda.matmul.allow_tf32)
    return info


def auto_choice(cell: str, B: int, H: int, by_impl: dict, device: str = "cpu") -> dict:
    """What impl auto trains with at this size: measured (from these medians, among the
    candidates) and unmeasured (``autotune: false``: the first candidate)."""
    import torch

    from seqmodels import backends
    from seqmodels.autotune import select

    stack, _ = build(cell, "autograd", B, 1, 1, H)
    like = torch.empty(B, 1, 1, device=device)
    candidates = backends.candidates(stack.kind, stack.first_cell(), like, ())
    measured = select({n: by_impl[n]["train_ms"] for n in candidates if n in by_impl}, candidates[0])
    return {"auto_measured": measured, "auto_static": candidates[0]}


def run_worker(args) -> None:
    B, T, I, H = args.size[0]
    if args.device == "cuda":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.no_tf32
    if args.worker == "time":
        result = time_config(args.cells, B, T, I, H, args.repeats, args.warmup, args.device)
    else:
        result = {"peak_mem_mb": peak_memory(args.cells, args.worker_impl, B, T, I, H)}
    print(json.dumps(result))


def subprocess_json(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--sizes", choices=sorted(SIZES), help="default: full on a CPU, gpu on CUDA")
    parser.add_argument("--cells", help="cells of the registry and their variants, comma-separated: "
                        f"{', '.join(variants())} (default: rnn,lstm; on CUDA rnn,lstm,lstm_peephole,gru)")
    parser.add_argument("--no-tf32", action="store_true", help="CUDA: exact float32 in cuDNN and the kernels")
    parser.add_argument("--bidirectional", action="store_true",
                        help="one bidirectional layer (seqmodels.nn) against torch.nn's")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (median of them)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-impl", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, nargs=4, action="append", metavar=("B", "T", "I", "H"),
                        help="run this size instead of --sizes (repeatable)")
    args = parser.parse_args()
    global BIDIRECTIONAL
    BIDIRECTIONAL = args.bidirectional
    if args.worker:
        return run_worker(args)
    args.sizes = args.sizes or ("gpu" if args.device == "cuda" else "full")
    args.cells = args.cells or ("rnn,lstm,lstm_peephole,gru" if args.device == "cuda" else "rnn,lstm")
    unknown = [c for c in args.cells.split(",") if c not in variants()]
    if unknown:
        parser.error(f"--cells: unknown {', '.join(unknown)}; one of {', '.join(variants())}")

    results = []
    machine = host(args.device)
    print(f"host: {machine['cpu']}, ISA {machine['isa']}, {machine['threads']} threads, torch {machine['torch']}",
          flush=True)
    if args.device == "cuda":
        print(f"gpu: {machine['gpu']}, CUDA {machine['cuda']}, cuDNN {machine['cudnn']}, Triton {machine['triton']}, "
              f"TF32 {'on' if not args.no_tf32 else 'off'}", flush=True)
    header = (f"{'cell':8} {'impl':9} {'B':>3} {'T':>4} {'I':>3} {'H':>4} | {'train tok/s':>11} "
              f"{'x torch':>7} | {'infer tok/s':>11} {'x torch':>7} | {'peak MB':>7}")
    print(header, flush=True)
    print("-" * len(header), flush=True)
    for cell in args.cells.split(","):
        for size in args.size or SIZES[args.sizes]:
            common = ["--cells", cell, "--size", *map(str, size), "--device", args.device] + \
                (["--bidirectional"] if args.bidirectional else []) + \
                (["--no-tf32"] if args.no_tf32 else [])
            rows = subprocess_json(["--worker", "time", "--repeats", str(args.repeats),
                                    "--warmup", str(args.warmup), *common])["rows"]
            for row in rows:
                if args.no_memory:
                    row["peak_mem_mb"] = None
                elif args.device == "cpu":
                    row["peak_mem_mb"] = subprocess_json(
                        ["--worker", "memory", "--worker-impl", row["impl"], *common])["peak_mem_mb"]
                mem = "" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:7.0f}"
                print(f"{cell:8} {row['impl']:9} {row['B']:3} {row['T']:4} {row['I']:3} {row['H']:4} | "
                      f"{row['train_tokens_per_s']:11.0f} {row['train_ratio_vs_native']:7.2f} | "
                      f"{row['infer_tokens_per_s']:11.0f} {row['infer_ratio_vs_native']:7.2f} | {mem:>7}",
                      flush=True)
                results.append(row)
            by_impl = {row["impl"]: row for row in rows}
            for row in rows:  # medians' ratio: how much faster than the readable autograd loop
                row["train_ratio_vs_autograd"] = by_impl["autograd"]["train_ms"] / row["train_ms"]
            choice = auto_choice(cell, size[0], size[3], by_impl, args.device)
            for row in rows:
                row.update(choice, isa=machine["isa"], device=args.device, gpu=machine.get("gpu"))
            fast = [n for n in by_impl if n not in (REFERENCE, "autograd")]
            if not fast:
                print(f"{'':18} autograd only (no hand-written backward); impl auto trains with "
                      f"{choice['auto_measured']}", flush=True)
                continue
            fastest = max(fast, key=lambda n: by_impl[n]["train_ratio_vs_autograd"])
            print(f"{'':18} {fastest} vs autograd, training: {by_impl[fastest]['train_ratio_vs_autograd']:.2f}x; "
                  f"impl auto trains with {choice['auto_measured']} here (measured; unmeasured: "
                  f"{choice['auto_static']})", flush=True)
    if args.json:
        print(json.dumps({"host": machine, "results": results}))


if __name__ == "__main__":
    main()
