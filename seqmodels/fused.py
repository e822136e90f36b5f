"""The C++ time loops of ``csrc/fused_bptt.cpp``, built at first use; None where they cannot be.

``loops()`` returns ``torch.ops.seqmodels_fused`` (rnn_forward, rnn_backward, lstm_forward,
lstm_backward) once the extension is built and loaded, or None. It is built once per machine
with torch.utils.cpp_extension (a C++ compiler and ninja; ~1 min on 2 cores, then cached
under ``TORCH_EXTENSIONS_DIR`` or ~/.cache/torch_extensions) for the CPU it runs on
(``-march=native``). Where it cannot be built, ``impl: cpp`` runs ``bptt/reference.py`` (same
math, plain torch, slower) after one warning that says why (``seqmodels.backends``).

``SEQMODELS_COMPILED=0`` turns all compiled code off, these loops and the Triton kernels: the
project's only environment variable (``compiled_code_enabled``).
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

import torch

from seqmodels import compat

CSRC = Path(__file__).with_name("csrc")


def compiled_code_enabled() -> bool:
    """False when the environment says ``SEQMODELS_COMPILED=0`` (no C++ loops, no Triton kernels)."""
    return os.environ.get("SEQMODELS_COMPILED", "1") != "0"


# (compiler flags, linker flags): with OpenMP the loops share each step between torch's
# threads; a compiler without it (clang on macOS, say) still builds them for one thread (same
# results, slower on several cores).
_OPENMP_FLAGS = ((("-fopenmp",), ("-fopenmp",)), (("-fopenmp-simd",), ()))


def _vector_flags(isa: str) -> list[str]:
    """GCC vectorizes with 256-bit registers on AVX-512 unless told otherwise; the step's
    elementwise loops run ~1.6x faster with 512 (docs/bptt.md)."""
    return ["-mprefer-vector-width=512"] if isa.startswith("avx512") else []


def extension_name() -> str:
    """One build per ISA level: a cache shared by machines of different CPUs keeps them apart."""
    return f"seqmodels_fused_{torch.backends.cpu.get_cpu_capability().lower()}"


@functools.lru_cache(maxsize=None)
def _build():
    from torch.utils import cpp_extension

    isa = torch.backends.cpu.get_cpu_capability().lower()
    name = extension_name()
    if not compat.extension_is_built(name):
        print(f"seqmodels: compiling the C++ BPTT loops for this CPU ({isa}), ~30 s, once", file=sys.stderr, flush=True)
    for omp_cflags, omp_ldflags in _OPENMP_FLAGS:
        try:
            cpp_extension.load(
                name=name, is_python_module=False, verbose=False,
                sources=[str(CSRC / "fused_bptt.cpp"), str(CSRC / "cell_steps.cpp")],
                extra_cflags=["-O3", "-march=native", "-fno-trapping-math", *omp_cflags, *_vector_flags(isa)],
                extra_ldflags=list(omp_ldflags))  # a new list: load() appends to it
            return torch.ops.seqmodels_fused
        except Exception as exc:  # noqa: BLE001 - any build failure means: use the reference
            error = exc
    lines = str(error).strip().splitlines() or [type(error).__name__]
    reason = next((line.strip() for line in lines if "error:" in line), lines[-1])
    warnings.warn(f"seqmodels: the fused C++ BPTT loops could not be built ({reason}); "
                  "impl cpp runs the plain-torch reference (correct, slower). Install a C++ "
                  "compiler and `pip install ninja` for the fast path.", stacklevel=3)
    return None


def loops():
    """``torch.ops.seqmodels_fused``, or None (compiled code turned off, or not buildable here)."""
    return _build() if compiled_code_enabled() else None
