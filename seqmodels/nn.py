"""RNN, LSTM and GRU for any PyTorch model: torch.nn's constructor, call, state shapes and
parameter names, computed by this project's cells (``seqmodels.registry``) on any backend
(``seqmodels.backends``), with the project's extras as keyword options.

    import seqmodels.nn as nn                                  # instead of: import torch.nn as nn
    lstm = nn.LSTM(128, 256, num_layers=2, dropout=0.2)        # what torch.nn.LSTM takes
    out, (h, c) = lstm(x)                                       # x (T, B, 128) -> out (T, B, 256)
    lstm = nn.LSTM(128, 256, zoneout_h=0.1, peephole=True)     # extras: keyword options

Every other name is torch.nn's (``nn.Linear``, ``nn.init``, ...), so a script swaps its
recurrent layers by changing that one import.

As torch's modules:
    input       (T, B, I), (B, T, I) with ``batch_first``, (T, I) unbatched, or a PackedSequence
    hx          None (zeros), a tensor h_0 (RNN, GRU) or (h_0, c_0) (LSTM), each
                (num_layers · num_directions, B, H), also with ``batch_first``
    returns     output (T, B, D·H) (a PackedSequence for one), h_n or (h_n, c_n)
    parameters  ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``, and
                ``..._reverse`` for the backward direction: torch's state dicts load both ways;
                initialised as torch does (same seed, same weights)

The reverse direction of a bidirectional layer reads each sequence from its own last step
(its length, for a PackedSequence), as torch does. Extras: ``impl`` and ``autotune``
(``seqmodels.backends``); ``recurrent_dropout``, ``zoneout_h``, ``zoneout_c``, ``weight_drop``
(``recurrent.RecurrentLayer`` has the equations); ``nonlinearity`` (RNN), ``forget_bias`` and
``peephole`` (LSTM). ``proj_size`` is refused: the hand-written backward has no projection.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import *  # noqa: F401,F403 - everything else is torch.nn's: `import seqmodels.nn as nn` swaps a script
from torch.nn import functional, init, parameter, utils  # noqa: F401 - and its submodules, as torch.nn has them
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from seqmodels import backends, compat
from seqmodels.errors import ConfigError
from seqmodels.recurrent import (ChoosesBackend, RecurrentLayer, Regularizers, _float32, check_regularizers,
                                 check_stack_args, regularizer_masks)
from seqmodels.registry import CELLS

EXTRAS = ("impl", "autotune", "recurrent_dropout", "zoneout_h", "zoneout_c", "weight_drop")


def reverse_padded(x: Tensor, lengths: Tensor | None) -> Tensor:
    """x (T, B, ·) with each sequence's first ``lengths[b]`` steps reversed (all T without
    lengths); padding stays where it is. Its own inverse."""
    if lengths is None:
        return x.flip(0)
    t = torch.arange(x.shape[0], device=x.device).unsqueeze(1)  # (T, 1)
    n = lengths.to(x.device).unsqueeze(0)                       # (1, B)
    index = torch.where(t < n, n - 1 - t, t)                     # (T, B)
    return x.gather(0, index.unsqueeze(-1).expand_as(x))


class RNNBase(ChoosesBackend, compat.FlattenOnApply, nn.Module):
    """torch.nn.RNNBase's interface over the registry's cell ``cell_type`` (module docstring)."""

    cell_type = ""
    torch_arguments = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
                       "device", "dtype")

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None,
                 *, proj_size: int = 0, impl: str = "auto", autotune: bool = True, recurrent_dropout: float = 0.0,
                 zoneout_h: float = 0.0, zoneout_c: float = 0.0, weight_drop: float = 0.0, **options) -> None:
        super().__init__()
        name, kind = type(self).__name__, CELLS[self.cell_type]
        for option in options:
            if option not in kind.options:
                raise ConfigError(f"{name}: unknown argument {option!r}; it takes torch.nn.{name}'s arguments "
                                  f"({', '.join(self.torch_arguments)}) and {', '.join(EXTRAS + tuple(kind.options))}")
        if proj_size:
            raise ConfigError(f"{name}: proj_size={proj_size} is not supported (the hand-written backward has no "
                              "projection); use proj_size=0, or torch.nn.LSTM for a projection")
        forget_bias = options.pop("forget_bias", None)  # None: torch's initialisation, untouched
        check_stack_args(self.cell_type, input_size, hidden_size, num_layers, dropout, **options)
        self.kind, self.autotune = kind, autotune
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size, self.forget_bias = bidirectional, 0, forget_bias
        self.regularizers = Regularizers(recurrent_dropout, zoneout_h, zoneout_c, weight_drop)
        check_regularizers(self.regularizers, kind, self.cell_type)
        directions = 2 if bidirectional else 1
        cells, self._suffixes = [], []
        with torch.random.fork_rng(devices=[]):  # the cells' own initialisation draws nothing from the stream
            for layer in range(num_layers):
                for direction in range(directions):
                    size = input_size if layer == 0 else hidden_size * directions
                    cells.append(kind.cell(size, hidden_size, **options))
                    self._suffixes.append(f"_l{layer}" + ("_reverse" if direction else ""))
        for cell, suffix in zip(cells, self._suffixes):
            for n, p in cell.named_parameters():
                if bias or not n.startswith("bias"):
                    self.register_parameter(n + suffix, p)
                else:
                    self.register_buffer(n + suffix, torch.zeros_like(p.detach()), persistent=False)
        self._layers = [RecurrentLayer(cell) for cell in cells]  # not submodules: the parameters are ours
        names = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if bias else ())
        self._flat_weights_names = [n + suffix for suffix in self._suffixes for n in names]
        self.reset_parameters()
        self.impl = impl
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """torch's: U(−1/√H, 1/√H) for every parameter in order; then the extras' own: peepholes
        at 0, the LSTM's forget-gate bias if ``forget_bias`` is given."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for n, p in self.named_parameters():
                if not n.startswith("weight_c"):
                    p.uniform_(-bound, bound)
            for n, p in self.named_parameters():
                if n.startswith("weight_c"):
                    p.zero_()
            if self.forget_bias is not None and self.bias:
                H = self.hidden_size
                for suffix in self._suffixes:
                    getattr(self, "bias_ih" + suffix)[H:2 * H].fill_(self.forget_bias)
                    getattr(self, "bias_hh" + suffix)[H:2 * H].zero_()

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("num_layers", 1), ("bias", True), ("batch_first", False), ("dropout", 0.0),
                              ("bidirectional", False)):
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)}"
        return text + ("" if self.impl == "auto" else f", impl={self.impl!r}")

    # ---- the cells see this module's parameters ---------------------------------------------
    def _sync_cells(self) -> None:
        """Point every cell at this module's tensors under torch's names, whatever replaced them
        (``load_state_dict(assign=True)``, ``torch.func.functional_call``, ``.to()``)."""
        for layer, suffix in zip(self._layers, self._suffixes):
            for n in layer.cell._parameters:
                layer.cell._parameters[n] = getattr(self, n + suffix)

    def first_cell(self) -> nn.Module:
        return self._layers[0].cell

    def key_parts(self, x: Tensor) -> tuple[str, int, int, int]:
        """(label, layers, batch, steps) of a call; x is (T, B, I) here."""
        return self.cell_type + ("-bidirectional" if self.bidirectional else ""), self.num_layers, x.shape[1], x.shape[0]

    # ---- the call -------------------------------------------------------------------------
    def forward(self, input: Tensor | PackedSequence, hx=None):
        name = type(self).__name__
        unbatched = False
        if isinstance(input, PackedSequence):
            if input.data.dim() != 2 or input.data.shape[1] != self.input_size:
                raise ConfigError(f"{name}: the PackedSequence has {tuple(input.data.shape[1:])} features a step, "
                                  f"expected input_size={self.input_size}")
            x, lengths = pad_packed_sequence(input)  # (T, B, I), the caller's batch order
        else:
            if input.dim() not in (2, 3) or input.shape[-1] != self.input_size:
                raise ConfigError(f"{name}: input of shape {tuple(input.shape)}; expected (T, B, {self.input_size})"
                                  f"{' with batch_first: (B, T, ' + str(self.input_size) + ')' if self.batch_first else ''}"
                                  f" or unbatched (T, {self.input_size})")
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else input.transpose(0, 1) if self.batch_first else input
            lengths = None
        state = self._initial_state(hx, x, unbatched)
        if torch.is_autocast_enabled(x.device.type):  # the recurrence in float32, as RecurrentStack's
            with torch.autocast(x.device.type, enabled=False):
                out, final = self._run(_float32(x), _float32(state), lengths)
        else:
            out, final = self._run(x, state, lengths)
        if isinstance(input, PackedSequence):
            order = input.sorted_indices if input.sorted_indices is not None else torch.arange(out.shape[1])
            data = pack_padded_sequence(out.index_select(1, order.to(out.device)), lengths.index_select(0, order.cpu()))
            output = PackedSequence(data.data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        elif unbatched:
            output, final = out.squeeze(1), tuple(f.squeeze(1) for f in final)
        else:
            output = out.transpose(0, 1) if self.batch_first else out
        return output, final if len(final) > 1 else final[0]

    def _initial_state(self, hx, x: Tensor, unbatched: bool) -> tuple[Tensor, ...]:
        """hx as a tuple of (L·D, B, H) tensors: zeros when None; else checked, one line if wrong."""
        name, n = type(self).__name__, len(self.kind.state)
        rows = self.num_layers * (2 if self.bidirectional else 1)
        if hx is None:
            return tuple(x.new_zeros(rows, x.shape[1], self.hidden_size) for _ in range(n))
        given = hx if isinstance(hx, tuple) else (hx,)
        if len(given) != n or not all(isinstance(t, Tensor) for t in given):
            want = "(h_0, c_0)" if n == 2 else "a tensor h_0"
            raise ConfigError(f"{name}: hx must be {want}, got {type(hx).__name__} of {len(given)}")
        expected = (rows, self.hidden_size) if unbatched else (rows, x.shape[1], self.hidden_size)
        for t in given:
            if tuple(t.shape) != expected:
                raise ConfigError(f"{name}: hx of shape {tuple(t.shape)}, expected {expected} (num_layers * "
                                  f"num_directions, {'' if unbatched else 'batch, '}hidden_size)")
        return tuple(t.unsqueeze(1) for t in given) if unbatched else given

    def _run(self, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None):
        self._sync_cells()
        return self.run_backend(self.backend_for(x, state, lengths), x, state, lengths)

    def run_backend(self, backend: str, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None):
        """Every layer and direction through one backend: x (T, B, I) -> (T, B, D·H), the final
        states (L·D, B, H)."""
        if backend == "torch":
            return self._forward_torch(x, state, lengths)
        if backend not in backends.HANDWRITTEN + ("autograd",):
            raise ValueError(f"unknown backend {backend!r}; one of {backends.BACKENDS}")
        if lengths is not None:
            lengths = lengths.to(x.device, torch.long).clamp(0, x.shape[0])
        mask = None if lengths is None else torch.arange(x.shape[0], device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
        directions = 2 if self.bidirectional else 1
        finals = [[] for _ in state]
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
            outputs = []
            for direction in range(directions):
                i = layer * directions + direction
                x_in = reverse_padded(x, lengths) if direction else x
                s0 = tuple(s[i] for s in state)
                if backend == "autograd":  # batch-first, drawing its own masks in the same order
                    out, s = self._layers[i](x_in.transpose(0, 1), s0, mask, self.regularizers, self.training)
                    out = out.transpose(0, 1).contiguous()  # dropout's mask follows memory order: as torch's
                else:
                    cell = self._layers[i].cell
                    masks = regularizer_masks(self.regularizers, cell, x.shape[1], x.shape[0], x, self.training,
                                              len(state))
                    out, s = self.kind.layers[backend](x_in.contiguous(), s0, cell, lengths, *masks)
                outputs.append(reverse_padded(out, lengths) if direction else out)
                for f, t in zip(finals, s):
                    f.append(t)
            x = torch.cat(outputs, -1) if directions > 1 else outputs[0]
        return x, tuple(torch.stack(f) for f in finals)

    # ---- torch's own op on these parameters -------------------------------------------------
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, n) for n in self._flat_weights_names]

    def flatten_parameters(self) -> None:
        """As torch.nn.RNNBase's: on a GPU, the weights become views of one buffer in cuDNN's
        layout (no per-call copy); a no-op on a CPU."""
        op = self.kind.native_op(self.first_cell())
        weights = self._flat_weights()
        if op is None or compat.cudnn_is_flat(weights) or not compat.cudnn_can_flatten(weights):
            return
        compat.cudnn_flatten_(weights, 4 if self.bias else 2, self.input_size, op.upper(), self.hidden_size,
                              self.num_layers, self.bidirectional)

    def _forward_torch(self, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None):
        if x.is_cuda:
            self.flatten_parameters()
        fn = compat.native_rnn_op(self.kind.native_op(self.first_cell()))
        hx = state if len(state) > 1 else state[0]
        args = (self._flat_weights(), self.bias, self.num_layers, self.dropout, self.training, self.bidirectional)
        if lengths is None:
            out, *final = fn(x, hx, *args, False)
            return out, tuple(final)
        packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
        order, unorder = packed.sorted_indices, packed.unsorted_indices
        hx = tuple(s.index_select(1, order) for s in state)
        out, *final = fn(packed.data, packed.batch_sizes, hx if len(hx) > 1 else hx[0], *args)
        out, _ = pad_packed_sequence(packed._replace(data=out), total_length=x.shape[0])
        return out, tuple(s.index_select(1, unorder) for s in final)


class RNN(RNNBase):
    """torch.nn.RNN's interface (``nonlinearity`` 'tanh' or 'relu', also as the 4th positional
    argument, as torch takes it); the project's Elman cell."""

    cell_type = "rnn"

    def __init__(self, *args, **kwargs) -> None:
        if len(args) > 3:  # torch.nn.RNN(input_size, hidden_size, num_layers, nonlinearity, bias, ...)
            kwargs["nonlinearity"] = args[3]
            args = args[:3] + args[4:]
        super().__init__(*args, **kwargs)


class LSTM(RNNBase):
    """torch.nn.LSTM's interface; the project's LSTM cell (``peephole``, ``forget_bias``: the
    initial forget-gate bias, None for torch's initialisation)."""

    cell_type = "lstm"


class GRU(RNNBase):
    """torch.nn.GRU's interface; the project's GRU cell."""

    cell_type = "gru"
