"""How a recurrence runs: the one place that decides, for a cell, its options, the device,
training or not and the sizes, which backend computes it.

Backends (the values of ``impl``; all compute the same function of the same parameters):

    torch      torch's own fused op, the cell's torch twin (oneDNN on a CPU, cuDNN on a GPU)
    cpp        the hand-written backward with its time loops in C++ (CPU; RNN and LSTM)
    reference  the hand-written backward in plain torch, line by line as docs/bptt.md derives it
    autograd   the readable loop over the cell's equations; autograd derives the backward
    triton     EXPERIMENTAL, opt-in only: the hand-written backward as Triton kernels on CUDA.
               They have not yet run on a GPU, so nothing chooses them but ``impl: triton``.
    auto       the default: the fastest proven backend for the call (below)

``auto``. The candidates are the proven backends that can run the call: ``torch`` (a torch
twin, no recurrent regularizer) and ``cpp`` (a CPU tensor, the loops built); where neither can,
``reference`` (a cell with a hand-written backward) and ``autograd``. With several candidates
the stack measures them once per machine and shape (``seqmodels.autotune``, cached on disk) and
keeps the fastest; with ``autotune: false`` it keeps the first. So on a GPU ``auto`` runs cuDNN,
or, with peepholes or regularizers, the faster of the reference and autograd. A candidate that
raises while it is measured is dropped with one line.

An ``impl`` other than ``auto`` runs that backend. Where it cannot run this call (``cpp`` off a
CPU or without its loops, ``triton`` without a CUDA GPU or Triton), one line says why and the
call runs ``reference`` for ``cpp`` (the same hand-written backward) and ``auto``'s choice for
``triton``. ``SEQMODELS_COMPILED=0`` turns all compiled code off (``fused.py``).

Each decision is said once, on stderr, and the tasks log it to the loggers (W&B's run config:
``model.backend``).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor, nn

from seqmodels.bptt import fast, gpu
from seqmodels.errors import ConfigError
from seqmodels.registry import CellType

BACKENDS = ("torch", "cpp", "reference", "autograd", "triton")
IMPLS = ("auto",) + BACKENDS
# old impl names -> what they now mean: bptt was the hand-written backward on its fastest path
DEPRECATED = {"native": "torch", "bptt": "cpp, or reference for a cell without C++ loops"}
HANDWRITTEN = ("cpp", "reference", "triton")     # backends that run a registry entry's ``layers``
DESCRIPTION = {
    "torch": "torch's fused op", "cpp": "the hand-written backward, C++ loops",
    "reference": "the hand-written backward, plain-torch reference", "autograd": "the cell's equations, autograd",
    "triton": "the hand-written backward, Triton kernels (experimental)",
}


def canonical_impl(impl: str, kind: CellType) -> str:
    """``impl`` as a config gives it -> one of ``IMPLS``: a deprecated name with one notice, an
    unknown one a one-line ConfigError that lists the valid values."""
    if impl in DEPRECATED:
        _deprecated(impl)
        return "torch" if impl == "native" else "cpp" if "cpp" in kind.layers else "reference"
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ConfigError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    return impl


@functools.lru_cache(maxsize=None)
def _deprecated(impl: str) -> None:
    warnings.warn(f"impl: {impl} is deprecated, use impl: {DEPRECATED[impl]} (valid values: {', '.join(IMPLS)})",
                  FutureWarning, stacklevel=5)


def runnable(kind: CellType, cell: nn.Module) -> list[str]:
    """The impls that can run this cell with its options (on a suitable device)."""
    return ["auto", "autograd"] + [b for b in BACKENDS if b in kind.layers or b == "torch" and kind.twin(cell)]


def check(impl: str, kind: CellType, cell: nn.Module, name: str, regularizers: tuple[str, ...]) -> None:
    """At construction: ``impl`` (canonical) can run this cell with these options and
    regularizers on some device, or a one-line ConfigError that names what can."""
    can = runnable(kind, cell)
    if impl == "torch" and kind.twin(cell) is None:
        chosen = ", ".join(f"{k}: {v}" for k, v in kind.options_of(cell).items() if v != kind.options[k])
        raise ConfigError(f"impl: torch cannot run cell: {name} with {chosen or 'these options'} (torch has no such "
                          f"op); use impl: {', '.join(can)}")
    if impl == "torch" and regularizers:
        can = [b for b in can if b != "torch"]
        raise ConfigError(f"impl: torch cannot apply {', '.join(regularizers)} (torch's fused ops have no such "
                          f"option); use impl: {', '.join(can)}")
    if impl not in can:
        raise ConfigError(f"impl: {impl} ({DESCRIPTION[impl]}) does not exist for cell: {name}; use impl: "
                          f"{', '.join(can)}")


def candidates(kind: CellType, cell: nn.Module, x: Tensor, regularizers: tuple[str, ...]) -> list[str]:
    """The proven backends that can run this call, ``auto``'s default first (module docstring)."""
    fast_ones = [b for b, ok in (("torch", not regularizers and kind.twin(cell) is not None),
                                 ("cpp", "cpp" in kind.layers and fast.runs(x))) if ok]
    return fast_ones or (["reference"] if "reference" in kind.layers else []) + ["autograd"]


def why_not(backend: str, kind: CellType, cell: nn.Module, x: Tensor) -> Optional[str]:
    """Why an asked-for backend cannot run this call, or None (what ``check`` cannot know
    before the call: the device, the dtype, the loops, Triton)."""
    if backend == "cpp" and not fast.runs(x):
        from seqmodels import fused

        if x.device.type != "cpu" or x.dtype not in fast.DTYPES:
            return f"the C++ loops run CPU float32 and float64, not {x.device.type} {x.dtype}"
        if not fused.compiled_code_enabled():
            return "SEQMODELS_COMPILED=0 turns compiled code off"
        return "the C++ loops could not be built here (see the warning above)"
    if backend == "triton":
        return gpu.why_not(x, x.shape[0], len(kind.gates) * cell.hidden_size)
    return None


@dataclass
class Choice:
    """What runs a call, and why: ``asked`` (impl named it), ``fallback`` (the asked one cannot
    run here), ``rule`` (auto, one candidate or no measuring), ``measured`` or ``cached``."""

    backend: str
    source: str
    detail: str = ""

    def why(self) -> str:
        return f"{self.source}{': ' + self.detail if self.detail else ''}"


def choose(impl: str, kind: CellType, cell: nn.Module, x: Tensor, regularizers: tuple[str, ...],
           measure: Optional[Callable[[list[str], str], Choice]] = None) -> Choice:
    """The backend for one call of a stack. ``impl`` is canonical; ``measure(candidates,
    default)`` (the stack's autotune, or None) picks among several candidates."""
    if impl != "auto":
        reason = why_not(impl, kind, cell, x)
        if reason is None:
            return Choice(impl, "asked")
        if impl == "cpp":
            fallback = Choice("reference", "fallback", f"impl cpp cannot run here ({reason})")
        else:
            fallback = choose("auto", kind, cell, x, regularizers, measure)
            fallback = Choice(fallback.backend, "fallback", f"impl {impl} cannot run here ({reason})")
        _notice(f"seqmodels: impl: {impl} cannot run here ({reason}); running {fallback.backend} "
                f"({DESCRIPTION[fallback.backend]}) instead")
        return fallback
    options = candidates(kind, cell, x, regularizers)
    if len(options) > 1 and measure is not None:
        return measure(options, options[0])
    return Choice(options[0], "rule", "the only candidate" if len(options) == 1 else "first candidate, not measured")


@functools.lru_cache(maxsize=None)
def _notice(line: str) -> None:
    warnings.warn(line, stacklevel=5)
