"""``impl: auto`` by measurement, the way ``cudnn.benchmark`` and Triton's autotune decide.

The first call of a stack with ``impl: auto`` at a new shape, in training or in inference,
times the candidate backends (``seqmodels.backends.candidates``) for a few passes on the
stack's own parameters (forward + backward in training, forward alone in inference) and keeps
the fastest:

    key       device, ISA (or GPU name), torch version, threads, cell, train or infer, layers,
              B, T, I, H, dtype (B and T rounded up to a power of two: one decision covers a
              range of shapes)
    measure   one untimed pass each (the first may build the C++ loops), then rounds of one
              timed pass each, alternating, until ROUNDS rounds or MAX_SECONDS are spent;
              the median per candidate decides, and a difference under MARGIN keeps the
              first candidate (noise does not flip a decision). A candidate that raises is
              dropped with one line; it never ends the run.
    cache     ``autotune.json`` in the cache folder (``$XDG_CACHE_HOME/seqmodels``), so later
              runs do not measure again

Measuring leaves no trace: gradients come from ``torch.autograd.grad`` (nothing accumulates in
``.grad``, the optimizer never sees them) and every random stream is forked and restored, so a
run's parameters, optimizer state and random numbers are those it would have had without it,
and exact resume holds. All candidates compute the same function of the same parameters.

A missing, corrupt or unreadable cache, one written by another torch version, or a cache
folder that cannot be written costs a one-line warning and a new measurement, never a crash.
``autotune: false`` (``model.init_args.network.autotune``) takes the first candidate unmeasured.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from seqmodels.caches import default_cache_dir

CACHE_VERSION = 2  # 2: backends named torch / cpp / reference / autograd, inference measured too
ROUNDS = 5          # timed passes per candidate at most
MAX_SECONDS = 3.0   # timed rounds stop once this much time is spent (after the first round)
MARGIN = 0.03       # a candidate must be this much faster (3%) to overrule the first one


@dataclass
class Decision:
    """What ``auto`` chose for one key, and the median seconds per training pass it measured."""

    impl: str
    seconds: dict[str, float] = field(default_factory=dict)
    source: str = "measured"  # measured | cached

    def why(self) -> str:
        timed = ", ".join(f"{impl} {1e3 * s:.1f} ms" for impl, s in sorted(self.seconds.items(), key=lambda kv: kv[1]))
        return f"{timed} per pass" if timed else "one candidate left"


def cache_file() -> Path:
    return default_cache_dir() / "autotune.json"


def bucket(n: int) -> int:
    """n rounded up to a power of two."""
    return 1 << max(int(n) - 1, 0).bit_length()


def device_name(device: torch.device) -> str:
    """``cpu-<ISA>`` (torch's dispatch level: avx2, avx512, ...) or ``cuda-<GPU name>``."""
    if device.type == "cuda":
        return f"cuda-{torch.cuda.get_device_name(device)}"
    return f"{device.type}-{torch.backends.cpu.get_cpu_capability().lower()}"


def make_key(device: torch.device, cell: str, training: bool, layers: int, batch: int, steps: int,
             input_size: int, hidden: int, dtype: torch.dtype) -> str:
    return "|".join([device_name(device), f"torch{torch.__version__}", f"threads{torch.get_num_threads()}", cell,
                     "train" if training else "infer", f"L{layers}", f"B{bucket(batch)}", f"T{bucket(steps)}",
                     f"I{input_size}", f"H{hidden}", str(dtype).removeprefix("torch.")])


def select(seconds: dict[str, float], first: str, margin: float = MARGIN) -> str:
    """The fastest candidate, unless ``first`` (the default) is within ``margin`` of it."""
    fastest = min(seconds, key=seconds.get)
    if first in seconds and seconds[first] <= seconds[fastest] * (1 + margin):
        return first
    return fastest


def measure(candidates: list[str], run: Callable[[str], None], clock: Callable[[], float] = time.perf_counter,
            rounds: int = ROUNDS, max_seconds: float = MAX_SECONDS,
            announce: Callable[[str], None] | None = None) -> dict[str, float]:
    """Median seconds of ``run(impl)`` per candidate: one untimed pass each, then up to
    ``rounds`` timed rounds (the order alternating), stopping once ``max_seconds`` are spent.
    A candidate whose untimed pass raises is dropped, with one line; if every one raises, the
    first error is raised."""
    errors: dict[str, Exception] = {}
    for impl in candidates:
        try:
            run(impl)
        except Exception as err:  # noqa: BLE001 - any failure of a candidate drops it, not the run
            errors[impl] = err
            (announce or say)(f"impl auto: dropped {impl} while measuring ({type(err).__name__}: "
                              f"{(str(err).strip().splitlines() or [''])[0][:160]})")
    candidates = [impl for impl in candidates if impl not in errors]
    if not candidates:
        raise next(iter(errors.values()))
    if len(candidates) == 1:
        return {candidates[0]: float("nan")}
    times: dict[str, list[float]] = {impl: [] for impl in candidates}
    start = clock()
    for r in range(rounds):
        for impl in (candidates if r % 2 == 0 else candidates[::-1]):
            t0 = clock()
            run(impl)
            times[impl].append(clock() - t0)
        if clock() - start >= max_seconds:
            break
    return {impl: statistics.median(t) for impl, t in times.items()}


class Cache:
    """The decisions on disk, read once per process; every problem is one warning."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.entries: dict[str, dict] | None = None
        self.writable = True

    def _load(self) -> dict[str, dict]:
        path = self.path or cache_file()
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
                raise ValueError("not an autotune cache")
        except (OSError, ValueError) as err:
            warnings.warn(f"impl auto: cannot read the autotune cache {path} ({type(err).__name__}: "
                          f"{str(err)[:80]}); measuring again", stacklevel=4)
            return {}
        if data.get("version") != CACHE_VERSION or data.get("torch") != torch.__version__:
            warnings.warn(f"impl auto: the autotune cache {path} was written by torch {data.get('torch')} in cache "
                          f"format {data.get('version')}; this is torch {torch.__version__}, format {CACHE_VERSION}: "
                          "measuring again", stacklevel=4)
            return {}
        return data["entries"]

    def get(self, key: str) -> Optional[dict]:
        if self.entries is None:
            self.entries = self._load()
        return self.entries.get(key)

    def put(self, key: str, decision: Decision) -> None:
        if self.entries is None:
            self.entries = self._load()
        self.entries[key] = {"impl": decision.impl, "seconds": decision.seconds}
        if not self.writable:
            return
        path = self.path or cache_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name + ".tmp-", delete=False) as tmp:
                json.dump({"version": CACHE_VERSION, "torch": torch.__version__, "entries": self.entries}, tmp,
                          indent=1, sort_keys=True)
            os.replace(tmp.name, path)  # atomic: a reader never sees half a file
        except OSError as err:
            self.writable = False
            warnings.warn(f"impl auto: cannot write the autotune cache {path} ({err.strerror or err}); "
                          "the decisions of this run are kept in memory only (set XDG_CACHE_HOME "
                          "to a writable folder)", stacklevel=4)


_CACHE = Cache()
_DECIDED: dict[str, Decision] = {}  # this process's decisions, by key


def reset(path: Path | None = None) -> None:
    """Forget this process's decisions and read the cache (``path``, or the default) again."""
    global _CACHE
    _CACHE = Cache(path)
    _DECIDED.clear()


def choose(key: str, candidates: list[str], first: str, run: Callable[[str], None],
           announce: Callable[[str], None] | None = None, clock: Callable[[], float] = time.perf_counter) -> Decision:
    """The decision for ``key``: this process's, else the cache's, else measured with ``run``
    (and cached)."""
    if key in _DECIDED and _DECIDED[key].impl in candidates:
        return _DECIDED[key]
    cached = _CACHE.get(key)
    if cached and cached.get("impl") in candidates:
        decision = Decision(cached["impl"], dict(cached.get("seconds") or {}), "cached")
    else:
        seconds = measure(candidates, run, clock, announce=announce)
        timed = {impl: s for impl, s in seconds.items() if s == s}  # NaN: the only one left, untimed
        decision = Decision(select(timed, first) if timed else next(iter(seconds)), timed)
        _CACHE.put(key, decision)
    _DECIDED[key] = decision
    return decision


def describe(key: str) -> str:
    """A key in words: ``train B≤32 T≤128 on cpu-avx512``."""
    parts = key.split("|")
    return f"{parts[4]} {parts[6].replace('B', 'B≤')} {parts[7].replace('T', 'T≤')} on {parts[0]}"


def say(line: str) -> None:
    """One line on stderr, from the first process only (DDP)."""
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def measuring_pass(stack, x: Tensor, state: tuple[Tensor, ...], lengths: Optional[Tensor],
                   training: bool) -> Callable[[str], None]:
    """``run(backend)``: one pass of ``stack`` through ``backend`` on its own parameters, leaving
    no trace (no ``.grad``, every random stream restored): forward + backward when ``training``,
    else the forward alone under no_grad."""
    params = [p for p in stack.parameters() if p.requires_grad]
    x = x.detach().requires_grad_(x.requires_grad and training)
    state = tuple(s.detach() for s in state)
    inputs = params + ([x] if x.requires_grad else [])
    devices = [x.device.index or 0] if x.device.type == "cuda" else []

    def run(backend: str) -> None:
        with torch.random.fork_rng(devices=devices, device_type=x.device.type if devices else "cuda"):
            if training:
                out, final = stack.run_backend(backend, x, state, lengths)
                loss = out.sum() + sum(f.sum() for f in final)
                torch.autograd.grad(loss, inputs, allow_unused=True)
            else:
                with torch.no_grad():
                    stack.run_backend(backend, x, state, lengths)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    return run
