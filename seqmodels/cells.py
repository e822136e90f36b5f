"""Recurrent cells, written out as equations. No Lightning, no data, no logging.

Parameter names and shapes follow ``torch.nn.RNN`` / ``torch.nn.LSTM`` (layer 0), so a
torch state dict maps onto these cells one to one.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

NONLINEARITIES = ("tanh", "relu")


class RNNCell(nn.Module):
    """Elman cell: h_t = f(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), f = tanh or relu."""

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
        """U(-1/sqrt(H), 1/sqrt(H)) for every parameter, as torch.nn.RNN."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """One step: x (B, I), h (B, H) -> h' (B, H)."""
        z = x @ self.weight_ih.T + self.bias_ih + h @ self.weight_hh.T + self.bias_hh
        return torch.tanh(z) if self.nonlinearity == "tanh" else torch.relu(z)


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
        bound = 1.0 / math.sqrt(H)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("weight_c"):
                    p.zero_()
                else:
                    p.uniform_(-bound, bound)
            self.bias_ih[H : 2 * H].fill_(self.forget_bias)
            self.bias_hh[H : 2 * H].zero_()

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """One step: x (B, I), (h, c) each (B, H) -> (h', c')."""
        h, c = state
        gates = x @ self.weight_ih.T + self.bias_ih + h @ self.weight_hh.T + self.bias_hh
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
