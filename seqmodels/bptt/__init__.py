"""Backpropagation through time written by hand, in two layers:

    reference.py  the readable one: plain torch, one ``autograd.Function`` per cell kind,
                  line by line as docs/bptt.md derives it; checked with gradcheck
    fast.py       the same formulas with the time loops in C++ (``csrc/``, built by
                  ``fused.py``), oneDNN GEMMs and reused buffers; checked against the reference

    gpu.py        the same on CUDA: the time loops as Triton kernels (``kernels.py``); checked
                  against the reference, on a CPU through the Triton interpreter

``rnn_layer`` / ``lstm_layer`` / ``gru_layer`` (what ``RecurrentStack(impl="bptt")`` calls, one
layer each) take the C++ loops on a CPU (float32/float64, the loops built; none for the GRU),
the Triton kernels on a GPU (``gpu.usable``), and the reference everywhere else (no compiler, no Triton, float64 on a GPU,
``SEQMODELS_FUSED=0`` / ``SEQMODELS_TRITON=0``; a GPU layer says why, once). All run one
``autograd.Function`` per layer: no per-step autograd graph.

Autocast: the Functions compute in float32. The entry points cast floating inputs to float32
and switch autocast off when it is on (what ``torch.amp.custom_fwd(..., cast_inputs=
torch.float32)`` does, for whatever device x lives on); autograd casts the float32 gradients
back to the inputs' dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqmodels.bptt import fast, gpu, reference
from seqmodels.bptt.fast import clear_buffer_pool

__all__ = ["rnn_layer", "lstm_layer", "gru_layer", "clear_buffer_pool", "fast", "gpu", "reference"]


def _float32(args: tuple) -> tuple:
    return tuple(t.float() if isinstance(t, Tensor) and t.is_floating_point() else t for t in args)


def _run(x: Tensor, function, args: tuple, *rest):
    """``function.apply(*args, *rest)`` in float32 with autocast off when autocast is on."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return function.apply(*_float32(args), *rest)
    return function.apply(*args, *rest)


def _gpu_kernels(x: Tensor, batch: int, gates: int) -> bool:
    """Whether the Triton kernels run this GPU layer; if not, one notice per reason."""
    reason = gpu.usable(x, batch, gates)
    if reason:
        gpu.notice(reason)
    return reason is None


def _needs_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def rnn_layer(x: Tensor, state: tuple[Tensor], cell, lengths: Optional[Tensor] = None,
              weight_hh: Optional[Tensor] = None, recurrent: Optional[Tensor] = None,
              zoneout: tuple = (None,)) -> tuple[Tensor, tuple[Tensor]]:
    """One RNN layer: x (T, B, I), state (h0,) each (B, H), lengths (B,) int64 in [0, T] or
    None -> output (T, B, H), (h_T,). The regularizers (``recurrent.regularizer_masks``):
    ``weight_hh`` used instead of ``cell.weight_hh`` (weight drop passes W_hh ⊙ M / (1 − p); its
    gradient reaches W_hh through autograd), ``recurrent`` r (B, H), ``zoneout`` (d_h,) with
    d_h (T, B, H), or None where off."""
    weights = (cell.weight_ih, cell.weight_hh if weight_hh is None else weight_hh, cell.bias_ih, cell.bias_hh)
    if fast.fused_kernels(x) is not None:
        args = (x, state[0], *weights, lengths)
        out, h = _run(x, fast.RNNFunction, args, cell.nonlinearity, _needs_graph(*args), recurrent, zoneout[0])
    elif _gpu_kernels(x, x.shape[1], cell.hidden_size):
        args = (x, state[0], *weights, lengths)
        out, h = _run(x, gpu.RNNTriton, args, cell.nonlinearity, _needs_graph(*args), recurrent, zoneout[0])
    else:
        mask = reference.step_mask(lengths, x.shape[0], x)
        out, h = _run(x, reference.RNNReference, (x, state[0], *weights, mask), cell.nonlinearity, recurrent,
                      zoneout[0])
    return out, (h,)


def lstm_layer(x: Tensor, state: tuple[Tensor, Tensor], cell, lengths: Optional[Tensor] = None,
               weight_hh: Optional[Tensor] = None, recurrent: Optional[Tensor] = None,
               zoneout: tuple = (None, None)) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One LSTM layer: x (T, B, I), state (h0, c0) -> output (T, B, H), (h_T, c_T) each (B, H);
    the regularizers as for ``rnn_layer``, ``zoneout`` = (d_h, d_c)."""
    peep = (cell.weight_ci, cell.weight_cf, cell.weight_co) if cell.peephole else (None,) * 3
    weights = (cell.weight_ih, cell.weight_hh if weight_hh is None else weight_hh, cell.bias_ih, cell.bias_hh, *peep)
    if fast.fused_kernels(x) is not None:
        args = (x, *state, *weights, lengths)
        out, h, c = _run(x, fast.LSTMFunction, args, _needs_graph(*args), recurrent, *zoneout)
    elif _gpu_kernels(x, x.shape[1], 4 * cell.hidden_size):
        args = (x, *state, *weights, lengths)
        out, h, c = _run(x, gpu.LSTMTriton, args, _needs_graph(*args), recurrent, *zoneout)
    else:
        mask = reference.step_mask(lengths, x.shape[0], x)
        out, h, c = _run(x, reference.LSTMReference, (x, *state, *weights, mask), recurrent, *zoneout)
    return out, (h, c)


def gru_layer(x: Tensor, state: tuple[Tensor], cell, lengths: Optional[Tensor] = None,
              weight_hh: Optional[Tensor] = None, recurrent: Optional[Tensor] = None,
              zoneout: tuple = (None,)) -> tuple[Tensor, tuple[Tensor]]:
    """One GRU layer, arguments as for ``rnn_layer``. No C++ loops: on a CPU the reference runs
    (oneDNN's GRU is the fast choice there, and ``auto`` measures both), on a GPU the kernels."""
    weights = (cell.weight_ih, cell.weight_hh if weight_hh is None else weight_hh, cell.bias_ih, cell.bias_hh)
    if _gpu_kernels(x, x.shape[1], 3 * cell.hidden_size):
        args = (x, state[0], *weights, lengths)
        out, h = _run(x, gpu.GRUTriton, args, _needs_graph(*args), recurrent, zoneout[0])
    else:
        mask = reference.step_mask(lengths, x.shape[0], x)
        out, h = _run(x, reference.GRUReference, (x, state[0], *weights, mask), recurrent, zoneout[0])
    return out, (h,)
