"""Unroll a cell over time, stack layers, and choose how the recurrence is computed.

``RecurrentStack(x, state=None, lengths=None) -> (output, state)`` mirrors torch.nn.RNN /
torch.nn.LSTM with ``batch_first=True``: x (B, T, I) -> output (B, T, H) of the last layer,
state ``h`` (num_layers, B, H) for the RNN and ``(h, c)`` for the LSTM.

Implementations (``impl``), all on the very same parameters:
    autograd  the readable loop over ``cells.py``; autograd derives the backward pass
    bptt      one ``torch.autograd.Function`` per layer with a hand-written backward through
              time (``bptt.py``, derivations in docs/bptt.md); all cells, peepholes included
    native    torch's fused kernels (oneDNN on CPU, cuDNN on GPU); no peepholes
    auto      the fastest correct one for the options (see ``resolve_impl``)

Precision: the recurrence always runs in the parameters' dtype, float32 under mixed precision
(``bf16-mixed``, ``16-mixed``): autocast is switched off inside the stack, whatever the impl
and the device. Mixed precision covers the layers around it (embedding, read-out, loss).
Under autocast torch would otherwise send cuDNN's RNN to float16 even for bf16 autocast
(no loss scaler there: small gradients flush to zero) and oneDNN's to bfloat16, which CPUs
without bf16 support cannot run. cuDNN may still use TF32 tensor cores for float32
(``torch.backends.cudnn.allow_tf32``, on by default).
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, _VF, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seqmodels import bptt, compat, fused
from seqmodels.cells import NONLINEARITIES, LSTMCell, RNNCell
from seqmodels.errors import ConfigError

CELLS = ("rnn", "lstm")
IMPLS = ("auto", "autograd", "bptt", "native")
State = Union[Tensor, tuple[Tensor, Tensor]]  # h, or (h, c); each (num_layers, B, H)


def check_stack_args(
    cell: str, input_size: int, hidden_size: int, num_layers: int, dropout: float,
    nonlinearity: str = "tanh", peephole: bool = False, impl: str = "auto",
) -> None:
    """Raise a one-line ConfigError naming the parameter and its allowed values."""
    if cell not in CELLS:
        raise ConfigError(f"cell must be one of {list(CELLS)}, got {cell!r}")
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    if nonlinearity not in NONLINEARITIES:
        raise ConfigError(f"nonlinearity must be one of {list(NONLINEARITIES)}, got {nonlinearity!r}")
    if impl not in IMPLS:
        raise ConfigError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    if peephole and cell != "lstm":
        raise ConfigError("peephole: true needs cell: lstm (the vanilla RNN has no cell state)")
    if impl == "native" and peephole:
        raise ConfigError("impl: native cannot run peephole LSTMs (torch.nn.LSTM has no peepholes); use impl: autograd, bptt or auto")


# LSTM training on CPU: oneDNN's LSTM trains as fast or faster than the fused bptt loops when a
# step is small, under BPTT_MIN_UNITS state units (B · H) or under BPTT_MIN_HIDDEN units per
# sequence (too few for the loops to share a step between threads). benchmarks/cells.py, AVX2
# host, bptt x nn.LSTM: 0.79-0.94x at (B, T, I, H) = (64, 20, 1, 32), 0.79-0.89x at
# (4, 64, 88, 256); 0.98-1.02x at (16, 64, 88, 256), 1.08-1.14x at (16, 64, 88, 128), 1.04-1.23x
# at (32, 64, 64, 128), 1.3-1.6x at B 64, H 256.
BPTT_MIN_UNITS = 16 * 128
BPTT_MIN_HIDDEN = 64


def resolve_impl(impl: str, peephole: bool, cell: str = "lstm", device_type: str = "cpu",
                 training: bool = False, batch: int | None = None, hidden: int | None = None
                 ) -> str:
    """The implementation ``auto`` stands for; any other ``impl`` is returned as is.

    ``auto`` picks the fastest correct implementation for the cell, the hardware and the call
    (``training``: a backward will follow), as measured by ``benchmarks/cells.py`` (numbers in
    README and docs/bptt.md):
        peephole LSTM              -> bptt    (native cannot; bptt trains faster than autograd)
        RNN on CPU                 -> bptt    (torch.nn.RNN's CPU path is not fused: the
                                               hand-written backward trains 1.6-2.4x faster)
        LSTM on CPU, training      -> bptt    when its fused C++ loops are built (fused.py)
                                               and the step is big enough: B · H >=
                                               BPTT_MIN_UNITS and H >= BPTT_MIN_HIDDEN
                                               (``batch``, ``hidden``): 1.0-1.6x oneDNN's LSTM
                                               for forward + backward; smaller: native
        LSTM on CPU, inference     -> native  (oneDNN's fused LSTM; bptt's forward is 0.8-1.0x)
        RNN / LSTM on GPU          -> native  (cuDNN)
    All of them compute the same function of the same parameters.
    """
    if impl != "auto":
        return impl
    if peephole:
        return "bptt"
    if device_type == "cpu":
        if cell == "rnn":
            return "bptt"
        big = batch is None or hidden is None or (
            batch * hidden >= BPTT_MIN_UNITS and hidden >= BPTT_MIN_HIDDEN)
        if training and big and fused.kernels() is not None:
            return "bptt"
    return "native"


def _float32(state: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    """Half-precision tensors (from layers under autocast) to float32; others as they are."""
    if isinstance(state, tuple):
        return tuple(_float32(s) for s in state)
    return state.float() if state.dtype in (torch.float16, torch.bfloat16) else state


class RecurrentLayer(nn.Module):
    """Unrolls one cell over time with ``unbind`` (O(T) backward, unlike ``x[:, t]``).

    With a mask, the state stops changing past each sequence's end:
        s_t = m_t ? cell(x_t, s_{t-1}) : s_{t-1},   output_t = m_t ? h_t : 0
    which is what torch computes on a PackedSequence.
    """

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: Tensor, state: State, mask: Tensor | None = None) -> tuple[Tensor, State]:
        outputs = []
        masks = mask.unsqueeze(-1).unbind(1) if mask is not None else None
        for t, x_t in enumerate(x.unbind(1)):
            new = self.cell(x_t, state)
            if masks is None:
                state = new
                outputs.append(new[0] if isinstance(new, tuple) else new)
                continue
            m = masks[t]
            if isinstance(new, tuple):
                state = tuple(torch.where(m, n, s) for n, s in zip(new, state))
                outputs.append(new[0] * m)
            else:
                state = torch.where(m, new, state)
                outputs.append(new * m)
        return torch.stack(outputs, 1), state


class RecurrentStack(nn.Module):
    """``num_layers`` recurrent layers with dropout between them (not after the last).

    Parameter names: ``layers.{l}.cell.weight_ih`` etc.; ``torch_state_dict`` /
    ``load_torch_state_dict`` convert to and from torch.nn.RNN / nn.LSTM names
    (``weight_ih_l{l}``), so weights move freely between the two.
    """

    def __init__(
        self,
        cell: str = "lstm",
        input_size: int = 1,
        hidden_size: int = 64,
        num_layers: int = 1,
        dropout: float = 0.0,
        nonlinearity: str = "tanh",
        forget_bias: float = 1.0,
        peephole: bool = False,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        check_stack_args(cell, input_size, hidden_size, num_layers, dropout, nonlinearity, peephole, impl)
        self.cell_type, self.hidden_size, self.num_layers = cell, hidden_size, num_layers
        self.dropout, self.nonlinearity, self.peephole = dropout, nonlinearity, peephole
        self.impl = impl
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        if cell == "rnn":
            cells = [RNNCell(i, hidden_size, nonlinearity) for i in sizes]
        else:
            cells = [LSTMCell(i, hidden_size, forget_bias, peephole) for i in sizes]
        self.layers = nn.ModuleList(RecurrentLayer(c) for c in cells)

    @property
    def is_lstm(self) -> bool:
        return self.cell_type == "lstm"

    def initial_state(self, batch_size: int, like: Tensor) -> State:
        """Zeros shaped (num_layers, B, H), as torch uses when no state is given."""
        h = like.new_zeros(self.num_layers, batch_size, self.hidden_size)
        return (h, h.clone()) if self.is_lstm else h

    def forward(
        self, x: Tensor, state: State | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """x (B, T, I), lengths (B,) or None -> output (B, T, H), final state."""
        if x.dim() != 3:
            raise ValueError(f"expected input of shape (B, T, F), got {tuple(x.shape)}")
        if torch.is_autocast_enabled(x.device.type):  # float32 recurrence (module docstring)
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(_float32(x), None if state is None else _float32(state), lengths)
        if state is None:
            state = self.initial_state(x.shape[0], x)
        training = self.impl == "auto" and torch.is_grad_enabled() and (  # only auto asks
            x.requires_grad or any(p.requires_grad for p in self.parameters()))
        impl = resolve_impl(self.impl, self.peephole, self.cell_type, x.device.type, training,
                            batch=x.shape[0], hidden=self.hidden_size)
        if impl == "native":
            return self._forward_native(x, state, lengths)
        if impl == "bptt":
            return self._forward_bptt(x, state, lengths)
        mask = None
        if lengths is not None:
            mask = torch.arange(x.shape[1], device=x.device) < lengths.to(x.device).unsqueeze(1)
        finals = []
        for l, layer in enumerate(self.layers):
            if l > 0 and self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
            layer_state = (state[0][l], state[1][l]) if self.is_lstm else state[l]
            x, s = layer(x, layer_state, mask)
            finals.append(s)
        if self.is_lstm:
            return x, (torch.stack([s[0] for s in finals]), torch.stack([s[1] for s in finals]))
        return x, torch.stack(finals)

    # ---- hand-written BPTT, one autograd.Function call per layer ---------------------
    def _forward_bptt(self, x: Tensor, state: State, lengths: Tensor | None) -> tuple[Tensor, State]:
        """Time-major inside (per-step slices contiguous); dropout between layers stays here."""
        if lengths is not None:
            lengths = lengths.to(x.device, torch.long).clamp(0, x.shape[1])
        x = x.transpose(0, 1).contiguous()
        finals = []
        for l, layer in enumerate(self.layers):
            if l > 0 and self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
            if self.is_lstm:
                x, h, c = bptt.lstm_layer(x, state[0][l], state[1][l], layer.cell, lengths)
                finals.append((h, c))
            else:
                x, h = bptt.rnn_layer(x, state[l], layer.cell, lengths)
                finals.append(h)
        if self.is_lstm:
            return x.transpose(0, 1), (torch.stack([s[0] for s in finals]), torch.stack([s[1] for s in finals]))
        return x.transpose(0, 1), torch.stack(finals)

    # ---- native kernels on the same parameters -------------------------------------
    def _flat_weights(self) -> list[Tensor]:
        return [p for layer in self.layers for p in
                (layer.cell.weight_ih, layer.cell.weight_hh, layer.cell.bias_ih, layer.cell.bias_hh)]

    def _cudnn_mode(self) -> str:
        return "lstm" if self.is_lstm else f"rnn_{self.nonlinearity}"

    def flatten_parameters(self) -> None:
        """On a GPU, make the weights that the native path hands to cuDNN views of one buffer in
        cuDNN's layout, as ``torch.nn.LSTM.flatten_parameters`` does: cuDNN then runs on the
        module's own parameters, with no per-call copy and no "not part of single contiguous
        chunk of memory" warning. Values, names and Parameter objects stay; no-op on CPU."""
        weights = self._flat_weights()
        if self.peephole or not compat.cudnn_can_flatten(weights) or compat.cudnn_is_flat(weights):
            return
        compat.cudnn_flatten_(weights, len(self._NAMES), self.layers[0].cell.input_size, self._cudnn_mode(),
                              self.hidden_size, self.num_layers)

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.cuda()``, ``.half()``: new storages, so flatten again (as torch.nn.LSTM)."""
        result = super()._apply(fn, *args, **kwargs)
        self.flatten_parameters()
        return result

    def _forward_native(self, x: Tensor, state: State, lengths: Tensor | None) -> tuple[Tensor, State]:
        """torch.nn.RNN / nn.LSTM's own call (``_VF``), on this module's parameters."""
        if x.is_cuda:
            self.flatten_parameters()  # a no-op once flat; covers modules built on the GPU
        hx = state if not self.is_lstm else tuple(state)
        args = (self._flat_weights(), True, self.num_layers, self.dropout, self.training, False)
        if self.is_lstm:
            fn = _VF.lstm
        else:
            fn = _VF.rnn_tanh if self.nonlinearity == "tanh" else _VF.rnn_relu
        if lengths is None:
            out, *final = fn(x, hx, *args, True)
            return out, (tuple(final) if self.is_lstm else final[0])
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        order, unorder = packed.sorted_indices, packed.unsorted_indices
        hx = tuple(s.index_select(1, order) for s in hx) if self.is_lstm else hx.index_select(1, order)
        out, *final = fn(packed.data, packed.batch_sizes, hx, *args)
        out, _ = pad_packed_sequence(
            packed._replace(data=out), batch_first=True, total_length=x.shape[1]
        )
        final = [s.index_select(1, unorder) for s in final]
        return out, (tuple(final) if self.is_lstm else final[0])

    # ---- torch.nn.RNN / nn.LSTM state dicts -----------------------------------------
    _NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

    def torch_state_dict(self) -> dict[str, Tensor]:
        """Parameters under torch.nn.RNN / nn.LSTM names (``weight_ih_l0``, ...)."""
        if self.peephole:
            raise ValueError("a peephole LSTM has no torch.nn.LSTM equivalent")
        return {f"{n}_l{l}": getattr(layer.cell, n).detach().clone()
                for l, layer in enumerate(self.layers) for n in self._NAMES}

    def load_torch_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load a torch.nn.RNN / nn.LSTM state dict (same cell, sizes and layers)."""
        expected = {f"{n}_l{l}" for l in range(self.num_layers) for n in self._NAMES}
        if set(state_dict) != expected:
            raise ValueError(f"state dict keys {sorted(state_dict)} do not match {sorted(expected)}")
        with torch.no_grad():
            for l, layer in enumerate(self.layers):
                for n in self._NAMES:
                    getattr(layer.cell, n).copy_(state_dict[f"{n}_l{l}"])
