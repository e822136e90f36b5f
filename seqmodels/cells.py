"""Recurrent cells, written out as equations. torch only: no Lightning, no data, no logging.

A cell computes one time step: ``cell(x, state) -> state``, x (B, I), state a tuple of (B, H)
tensors with h first (h is what the layer outputs): ``(h,)`` for the vanilla RNN and the GRU,
``(h, c)`` for the LSTM and the RRU.
Parameter names and shapes follow ``torch.nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (layer 0), so a
torch state dict maps onto these cells one to one.

``seqmodels.registry.CELLS`` describes each cell once (its gates, state, options, torch twin and
hand-written backward); everything else asks the registry.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
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


class RRUCell(nn.Module):
    """Residual Recurrent Unit (Zakovskis et al. 2021, "Gates are not what you need in RNNs"),
    one ReLU layer, as in LUMII-Syslab/RRU ``cells/RRUCell.py``. No gate: a normalized ReLU
    layer of width M = round(middle_multiplier · (I + H)) reads the input and the residual
    state c, and a linear map of it gives both the update of c and the output h:

        j = ReLU(norm(W_ih x + b_ih + W_hh c + b_hh))         (M units)
        norm(a) = a / sqrt(mean(a²) + 1e-6)                  (over the M units; no centring, no gain)
        [c̃, h'] = W_out dropout(j) + b_out                   (H each)
        c' = σ(10 · retain) ⊙ c + rezero ⊙ c̃

    ``rezero`` (H,) starts at 0 (ReZero: the state starts as a pure decay); ``retain`` (H,) at
    logit(U(0.01, 0.99)) / 10, used times 10 so that Adam moves it 10x faster (the paper's
    ``mul_lr_multiplier``). ``middle_dropout`` is the paper's dropout on j: a fresh mask at every
    step, in training only. W_ih, W_hh and W_out start Glorot-uniform, the biases at 0.

    Where it differs from the paper's cell: h has the state's size H (the paper's output has a
    size of its own, 64 in its music runs), and the initial state is the stack's zeros (the
    paper's puts sqrt(H) / 4 on the first unit of c).
    """

    def __init__(self, input_size: int, hidden_size: int, middle_multiplier: float = 2.0,
                 middle_dropout: float = 0.0) -> None:
        super().__init__()
        if not middle_multiplier > 0:
            raise ValueError(f"middle_multiplier must be > 0, got {middle_multiplier!r}")
        if not 0.0 <= middle_dropout < 1.0:
            raise ValueError(f"middle_dropout must be in [0, 1), got {middle_dropout!r}")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.middle_multiplier, self.middle_dropout = middle_multiplier, middle_dropout
        M = self.middle_size = max(1, round(middle_multiplier * (input_size + hidden_size)))
        self.weight_ih = nn.Parameter(torch.empty(M, input_size))
        self.weight_hh = nn.Parameter(torch.empty(M, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(M))
        self.bias_hh = nn.Parameter(torch.empty(M))
        self.weight_out = nn.Parameter(torch.empty(2 * hidden_size, M))  # rows: c̃, then h
        self.bias_out = nn.Parameter(torch.empty(2 * hidden_size))
        self.retain = nn.Parameter(torch.empty(hidden_size))
        self.rezero = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        I, H, M = self.input_size, self.hidden_size, self.middle_size
        with torch.no_grad():
            bound = math.sqrt(6.0 / (I + H + M))  # Glorot over the paper's one [x, c] -> j kernel
            self.weight_ih.uniform_(-bound, bound)
            self.weight_hh.uniform_(-bound, bound)
            bound = math.sqrt(6.0 / (M + 2 * H))
            self.weight_out.uniform_(-bound, bound)
            for p in (self.bias_ih, self.bias_hh, self.bias_out, self.rezero):
                p.zero_()
            keep = torch.empty(H).uniform_(0.01, 0.99)
            self.retain.copy_(torch.log(keep / (1 - keep)) / 10)

    def forward(self, x: Tensor, state: State, weight_hh: Tensor | None = None,
                recurrent_mask: Tensor | None = None) -> State:
        """One step: x (B, I), (h, c) each (B, H) -> (h', c'). The previous h is not read (it is
        only the output); ``weight_hh`` and ``recurrent_mask`` act on c where it enters W_hh."""
        _, c = state
        w_hh = self.weight_hh if weight_hh is None else weight_hh
        c_in = c if recurrent_mask is None else c * recurrent_mask
        a = x @ self.weight_ih.T + self.bias_ih + c_in @ w_hh.T + self.bias_hh  # (B, M)
        j = torch.relu(a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6))
        if self.middle_dropout:
            j = F.dropout(j, self.middle_dropout, self.training)
        c_tilde, h = (j @ self.weight_out.T + self.bias_out).chunk(2, dim=1)
        return h, torch.sigmoid(10 * self.retain) * c + self.rezero * c_tilde
