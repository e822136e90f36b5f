"""Recurrent cells, written out as equations. torch only: no Lightning, no data, no logging.

A cell computes one time step: ``cell(x, state) -> state``, x (B, I), state a tuple of (B, H)
tensors with h first: ``(h,)`` for the vanilla RNN and the GRU, ``(h, c)`` for the LSTM.
Parameter names and shapes follow ``torch.nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (layer 0), so a
torch state dict maps onto these cells one to one.

``seqmodels.registry.CELLS`` describes each cell once (its gates, state, options, torch twin and
hand-written backward); everything else asks the registry.
"""
from __future__ import annotations

import math
import torch
from torch import Tensor, nn

NONLINEARITIES = ("tanh", "relu")
State = tuple[Tensor, ...]  # h first: (h,) or (h, c); (B, H) per cell, (num_layers, B, H) per stack


def _uniform_(cell: nn.Module) -> None:
    """U(-1/sqrt(H), 1/sqrt(H)) for every parameter, as torch.nn.RNN / LSTM / GRU."""
    bound = 1.0 / math.sqrt(cell.hidden_size)
    with torch.no_grad():
        for p in cell.parameters():
            p.uniform_(-bound, bound)


class RNNCell(nn.Module):
    """Elman cell: h' = f(W_ih x + b_ih + W_hh h + b_hh), f = tanh or relu."""

    def __init__(self, input_size: int, hidden_size: int, nonlinearity: str = "tanh") -> None:
        super().__init__()
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
        self.input_size, self.hidden_size, self.nonlinearity = input_size, hidden_size, nonlinearity
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _uniform_(self)

    def forward(self, x: Tensor, state: State, weight_hh: Tensor | None = None,
                recurrent_mask: Tensor | None = None) -> State:
        """One step: x (B, I), (h,) each (B, H) -> (h',). ``weight_hh``: W_hh to use instead of
        the parameter (weight drop); ``recurrent_mask`` (B, H): multiplies h where it enters
        W_hh (recurrent dropout). Both are drawn by the layer, once per sequence."""
        (h,) = state
        w_hh = self.weight_hh if weight_hh is None else weight_hh
        h_in = h if recurrent_mask is None else h * recurrent_mask
        z = x @ self.weight_ih.T + self.bias_ih + h_in @ w_hh.T + self.bias_hh
        return (torch.tanh(z) if self.nonlinearity == "tanh" else torch.relu(z),)


class LSTMCell(nn.Module):
    """LSTM cell in PyTorch's formulation, gates stacked in the order (i, f, g, o).

        i = σ(W_ii x + b_ii + W_hi h + b_hi [+ w_ci ⊙ c_{t-1}])
        f = σ(W_if x + b_if + W_hf h + b_hf [+ w_cf ⊙ c_{t-1}])
        g = tanh(W_ig x + b_ig + W_hg h + b_hg)
        c' = f ⊙ c + i ⊙ g
        o = σ(W_io x + b_io + W_ho h + b_ho [+ w_co ⊙ c'])
        h' = o ⊙ tanh(c')

    The bracketed peephole terms (Gers & Schmidhuber 2000) are present when
    ``peephole=True``; ``weight_ci``, ``weight_cf``, ``weight_co`` are (H,) vectors.
    ``forget_bias`` is the initial value of the forget gate's bias (put in ``bias_ih``;
    ``bias_hh``'s forget slice starts at 0), so the cell starts out remembering.
    """

    def __init__(
        self, input_size: int, hidden_size: int, forget_bias: float = 1.0, peephole: bool = False
    ) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.forget_bias, self.peephole = forget_bias, peephole
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size))
        if peephole:
            self.weight_ci = nn.Parameter(torch.empty(hidden_size))
            self.weight_cf = nn.Parameter(torch.empty(hidden_size))
            self.weight_co = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(-1/sqrt(H), 1/sqrt(H)) as torch.nn.LSTM, then the forget bias; peepholes at 0."""
        H = self.hidden_size
        _uniform_(self)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("weight_c"):
                    p.zero_()
            self.bias_ih[H : 2 * H].fill_(self.forget_bias)
            self.bias_hh[H : 2 * H].zero_()

    def forward(self, x: Tensor, state: State, weight_hh: Tensor | None = None,
                recurrent_mask: Tensor | None = None) -> State:
        """One step: x (B, I), (h, c) each (B, H) -> (h', c'); ``weight_hh`` and
        ``recurrent_mask`` as for ``RNNCell`` (h ⊙ mask enters every gate's W_h· h)."""
        h, c = state
        w_hh = self.weight_hh if weight_hh is None else weight_hh
        h_in = h if recurrent_mask is None else h * recurrent_mask
        gates = x @ self.weight_ih.T + self.bias_ih + h_in @ w_hh.T + self.bias_hh
        i, f, g, o = gates.chunk(4, dim=1)
        if self.peephole:
            i = i + self.weight_ci * c
            f = f + self.weight_cf * c
        i, f, g = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g)
        c_next = f * c + i * g
        if self.peephole:
            o = o + self.weight_co * c_next
        h_next = torch.sigmoid(o) * torch.tanh(c_next)
        return h_next, c_next


class GRUCell(nn.Module):
    """GRU cell in PyTorch's formulation (Cho et al. 2014), gates stacked in the order (r, z, n).

        r = σ(W_ir x + b_ir + W_hr h + b_hr)
        z = σ(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
        h' = (1 − z) ⊙ n + z ⊙ h

    The reset gate multiplies the recurrent term after its bias (torch's and cuDNN's variant),
    so the recurrent pre-activations stay one GEMM.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _uniform_(self)

    def forward(self, x: Tensor, state: State, weight_hh: Tensor | None = None,
                recurrent_mask: Tensor | None = None) -> State:
        """One step: x (B, I), (h,) each (B, H) -> (h',); ``weight_hh`` and ``recurrent_mask``
        as for ``RNNCell``: the mask reaches h in W_h· h only, not the carried z ⊙ h."""
        (h,) = state
        w_hh = self.weight_hh if weight_hh is None else weight_hh
        h_in = h if recurrent_mask is None else h * recurrent_mask
        x_r, x_z, x_n = (x @ self.weight_ih.T + self.bias_ih).chunk(3, dim=1)
        h_r, h_z, h_n = (h_in @ w_hh.T + self.bias_hh).chunk(3, dim=1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return ((1 - z) * n + z * h,)
