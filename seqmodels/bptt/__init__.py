"""Backpropagation through time written by hand, one ``autograd.Function`` per layer (no
per-step autograd graph), in three implementations of the same formulas (docs/bptt.md):

    reference.py  the readable one: plain torch, line by line as docs/bptt.md derives it;
                  checked with gradcheck. Runs anywhere (``impl: reference``).
    fast.py       the time loops in C++ (``csrc/``, built by ``fused.py``), oneDNN GEMMs and
                  reused buffers, for CPU float32/float64 (``impl: cpp``; RNN and LSTM).
    gpu.py        the time loops as Triton kernels (``kernels.py``) on CUDA (``impl: triton``:
                  experimental, opt-in until measured on a GPU).

The ``*_layer`` functions below run one layer through one of them; which one runs is decided
in ``seqmodels.backends`` and nowhere else. Every layer function takes
``(x (T, B, I), state (each (B, H)), cell, lengths (B,) int64 in [0, T] or None, weight_hh or
None, recurrent (B, H) or None, zoneout)`` and returns ``(output (T, B, H), final state)``.
Those with ``runs_reverse`` (the C++ loops) also take ``reverse=True``: the reverse direction of a
bidirectional layer on x as it is, each sequence read from its own last step; the others get a
time-reversed copy (``recurrent.reverse_padded``).
The regularizers come from ``recurrent.regularizer_masks``: ``weight_hh`` replaces
``cell.weight_hh`` (weight drop passes W_hh ⊙ M / (1 − p); its gradient reaches W_hh through
autograd), ``recurrent`` is the recurrent-dropout mask, ``zoneout`` one d (T, B, H) or None
per state tensor.

Autocast: the Functions compute in float32. The entry points cast floating inputs to float32
and switch autocast off when it is on (what ``torch.amp.custom_fwd(..., cast_inputs=
torch.float32)`` does, for whatever device x lives on); autograd casts the float32 gradients
back to the inputs' dtypes.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from seqmodels.bptt import fast, gpu, reference
from seqmodels.bptt.fast import clear_buffer_pool

__all__ = ["LAYERS", "clear_buffer_pool", "fast", "gpu", "reference"]


def _float32(args: tuple) -> tuple:
    return tuple(t.float() if isinstance(t, Tensor) and t.is_floating_point() else t for t in args)


def _run(x: Tensor, function, args: tuple, *rest):
    """``function.apply(*args, *rest)`` in float32 with autocast off when autocast is on."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return function.apply(*_float32(args), *rest)
    return function.apply(*args, *rest)


def _needs_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _weights(cell, weight_hh: Optional[Tensor]) -> tuple:
    """The cell's weights in the Functions' order (the LSTM's three peephole vectors or Nones)."""
    weights = (cell.weight_ih, cell.weight_hh if weight_hh is None else weight_hh, cell.bias_ih, cell.bias_hh)
    if hasattr(cell, "peephole"):
        weights += (cell.weight_ci, cell.weight_cf, cell.weight_co) if cell.peephole else (None,) * 3
    return weights


def _layer(function, options: Callable[[object], tuple] = lambda cell: ()) -> Callable:
    """A layer function (module docstring) that runs ``function``: the reference takes the step
    mask, the compiled ones the lengths and whether a backward will follow. ``options``: the
    cell's own arguments that follow the weights (the RNN's nonlinearity)."""
    def layer(x: Tensor, state: tuple, cell, lengths: Optional[Tensor] = None, weight_hh: Optional[Tensor] = None,
              recurrent: Optional[Tensor] = None, zoneout: tuple = (None, None), reverse: bool = False
              ) -> tuple[Tensor, tuple]:
        zoneout = tuple(zoneout)[:len(state)]
        if reverse and not layer.runs_reverse:
            raise ValueError(f"{function.__name__} has no reverse direction; give it reverse_padded(x)")
        if function in REFERENCE:
            args = (x, *state, *_weights(cell, weight_hh), reference.step_mask(lengths, x.shape[0], x))
            out, *final = _run(x, function, args, *options(cell), recurrent, *zoneout)
        else:
            args = (x, *state, *_weights(cell, weight_hh), lengths)
            out, *final = _run(x, function, args, *options(cell), _needs_graph(*args), recurrent, *zoneout,
                               *((True,) if reverse else ()))
        return out, tuple(final)

    layer.runs_reverse = function in (fast.RNNFunction, fast.LSTMFunction)

    if function not in REFERENCE:
        # compiled code (a C++ op, Triton kernels) has no fake-tensor kernel for torch.compile to
        # trace: the layer runs eagerly there, a graph break
        layer = torch.compiler.disable(layer)
    return layer


REFERENCE = (reference.RNNReference, reference.LSTMReference, reference.GRUReference)
_nonlinearity = lambda cell: (cell.nonlinearity,)  # noqa: E731

# cell kind -> backend -> layer function; the registry (seqmodels.registry) points here
LAYERS = {
    "rnn": {"reference": _layer(reference.RNNReference, _nonlinearity), "cpp": _layer(fast.RNNFunction, _nonlinearity),
            "triton": _layer(gpu.RNNTriton, _nonlinearity)},
    "lstm": {"reference": _layer(reference.LSTMReference), "cpp": _layer(fast.LSTMFunction),
             "triton": _layer(gpu.LSTMTriton)},
    "gru": {"reference": _layer(reference.GRUReference), "triton": _layer(gpu.GRUTriton)},
}
