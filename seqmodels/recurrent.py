"""Unroll a cell over time, stack layers, and choose how the recurrence is computed.

``RecurrentStack(x, state=None, lengths=None) -> (output, state)`` mirrors torch.nn.RNN /
nn.LSTM / nn.GRU with ``batch_first=True``: x (B, T, I) -> output (B, T, H) of the last layer,
state always a tuple, h first: ``(h,)`` for the RNN and the GRU, ``(h, c)`` for the LSTM, each
(num_layers, B, H). What differs between cells comes from the registry (``registry.CELLS``).

How the recurrence is computed (``impl``: torch's fused op, the C++ loops or the plain-torch
reference of the hand-written backward, autograd over the cell's equations; ``auto`` by
default) is decided in ``seqmodels.backends``, and only there. All run on the very same
parameters and compute the same function.

Precision: the recurrence always runs in the parameters' dtype, float32 under mixed precision
(``bf16-mixed``, ``16-mixed``): autocast is switched off inside the stack, whatever the impl
and the device. Mixed precision covers the layers around it (embedding, read-out, loss).
Under autocast torch would otherwise send cuDNN's RNN to float16 even for bf16 autocast
(no loss scaler there: small gradients flush to zero) and oneDNN's to bfloat16, which CPUs
without bf16 support cannot run. cuDNN may still use TF32 tensor cores for float32
(``torch.backends.cudnn.allow_tf32``, on by default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from seqmodels import autotune, backends, compat
from seqmodels.cells import NONLINEARITIES, State
from seqmodels.errors import ConfigError
from seqmodels.registry import CELLS, REGULARIZERS, CellType


@dataclass(frozen=True)
class Regularizers:
    """The probabilities of the stack's recurrent regularizers (0: off)."""

    recurrent_dropout: float = 0.0
    zoneout_h: float = 0.0
    zoneout_c: float = 0.0
    weight_drop: float = 0.0

    def active(self) -> tuple[str, ...]:
        return tuple(name for name in REGULARIZERS if getattr(self, name))


def check_regularizers(regs: Regularizers, kind: CellType, name: str) -> None:
    """Each a probability in [0, 1), zoneout_c only for a cell with a cell state; else a
    one-line ConfigError."""
    for reg in REGULARIZERS:
        p = getattr(regs, reg)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ConfigError(f"{reg} must be in [0, 1) (a probability; 0 turns it off), got {p!r}")
    if regs.zoneout_c and "c" not in kind.state:
        raise ConfigError(f"zoneout_c: {regs.zoneout_c} does not apply to cell: {name}, which has no cell state c "
                          "(zoneout_h zones out its h)")


def check_stack_args(cell: str, input_size: int, hidden_size: int, num_layers: int, dropout: float,
                     **options) -> None:
    """Raise a one-line ConfigError naming the parameter and its allowed values."""
    if cell not in CELLS:
        raise ConfigError(f"cell must be one of {list(CELLS)}, got {cell!r}")
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    if options.get("nonlinearity", "tanh") not in NONLINEARITIES:
        raise ConfigError(f"nonlinearity must be one of {list(NONLINEARITIES)}, got {options['nonlinearity']!r}")
    kind = CELLS[cell]
    defaults = {k: v for other in CELLS.values() for k, v in other.options.items()}
    for name, value in options.items():
        if name not in kind.options and value != defaults.get(name):
            takes = f"its options: {', '.join(kind.options)}" if kind.options else "it has no options"
            raise ConfigError(f"{name}: {value!r} does not apply to cell: {cell} ({takes})")


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

    Regularizers inside the recurrence (``Regularizers``), in training; p is each one's probability:
        weight drop        W̃_hh = W_hh ⊙ M / (1 − p), M ~ Bernoulli(1 − p) per entry, drawn once
                           per forward and used at every step (DropConnect; Merity et al. 2017)
        recurrent dropout  W_hh (h_{t-1} ⊙ ρ) with ρ = mask / (1 − p), mask ~ Bernoulli(1 − p) per
                           sequence and unit, the same at every step (Gal & Ghahramani 2016)
        zoneout            h_t = d_t ⊙ h_{t-1} + (1 − d_t) ⊙ h̃_t with d_t ~ Bernoulli(p) per step,
                           sequence and unit (zoneout_h; zoneout_c the same for c) (Krueger et al. 2017)
    At evaluation weight drop and recurrent dropout are off and zoneout takes its expectation,
    h_t = p h_{t-1} + (1 − p) h̃_t. Random draws, in this order (``regularizer_masks``): W's
    mask, ρ, d for h at every step, d for c at every step.
    """

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: Tensor, state: State, mask: Tensor | None = None,
                regs: Regularizers = Regularizers(), training: bool = False) -> tuple[Tensor, State]:
        """x (B, T, I), state tuple of (B, H), mask (B, T) or None -> output (B, T, H), state."""
        B, T = x.shape[:2]
        weight_hh, recurrent, zoneout = regularizer_masks(regs, self.cell, B, T, x, training, len(state))
        outputs = []
        masks = mask.unsqueeze(-1).unbind(1) if mask is not None else None
        for t, x_t in enumerate(x.unbind(1)):
            new = self.cell(x_t, state, weight_hh=weight_hh, recurrent_mask=recurrent)
            new = tuple(n if d is None else d[t] * s + (1 - d[t]) * n for n, s, d in zip(new, state, zoneout))
            if masks is None:
                state = new
                outputs.append(new[0])
            else:
                state = tuple(torch.where(masks[t], n, s) for n, s in zip(new, state))
                outputs.append(new[0] * masks[t])
        return torch.stack(outputs, 1), state


def regularizer_masks(regs: Regularizers, cell: nn.Module, B: int, T: int, like: Tensor, training: bool,
                      n_state: int) -> tuple[Tensor | None, Tensor | None, tuple[Tensor | None, ...]]:
    """The regularizers of one layer's forward, drawn in this order: W̃_hh (weight drop, or None),
    ρ (B, H) (recurrent dropout, or None), then zoneout's d (T, B, H) for h and for c (None where
    off; filled with p at evaluation, its expectation). Every impl draws them here, so autograd
    and bptt see the same masks."""
    weight_hh = recurrent = None
    if training and regs.weight_drop:
        weight_hh = F.dropout(cell.weight_hh, regs.weight_drop, True)
    if training and regs.recurrent_dropout:
        recurrent = F.dropout(like.new_ones(B, cell.hidden_size), regs.recurrent_dropout, True)
    zoneout = []
    for p in (regs.zoneout_h, regs.zoneout_c)[:n_state]:
        full = like.new_full((T, B, cell.hidden_size), p) if p else None
        zoneout.append(torch.bernoulli(full) if p and training else full)
    return weight_hh, recurrent, tuple(zoneout)


class ChoosesBackend:
    """``impl`` and the backend of each call, for a module of recurrent layers (RecurrentStack,
    ``seqmodels.nn``): the decision itself is ``backends.choose``; this keeps it per call key,
    says it once and lets autotune measure the module's own ``run_backend``. The module has
    ``kind``, ``cell_type``, ``regularizers``, ``autotune``, ``first_cell()`` and ``key_parts(x)``."""

    @property
    def impl(self) -> str:
        """How the recurrence runs (``seqmodels.backends``); set it to change that."""
        return self._impl

    @impl.setter
    def impl(self, impl: str) -> None:
        impl = backends.canonical_impl(impl, self.kind)
        backends.check(impl, self.kind, self.first_cell(), self.cell_type, self.regularizers.active())
        self._impl = impl
        if not hasattr(self, "_chosen"):
            self.backends: dict[str, backends.Choice] = {}  # what ran, by call key (the tasks log these)
            self._chosen: dict[tuple[str, str], backends.Choice] = {}  # by (impl, call key)

    def call_key(self, x: Tensor, training: bool) -> str:
        """What one decision covers: device, cell and options, train or infer, layers and sizes
        (``autotune.make_key``)."""
        cell = self.first_cell()
        label, layers, batch, steps = self.key_parts(x)
        label += "".join(f"-{k}={v}" for k, v in self.kind.options_of(cell).items()
                         if v != self.kind.options[k] and k != "forget_bias")
        label += "-regularized" if self.regularizers.active() else ""  # other candidates
        return autotune.make_key(x.device, label, training, layers, batch, steps, cell.input_size, cell.hidden_size,
                                 x.dtype)

    def backend_for(self, x: Tensor, state: State, lengths: Tensor | None) -> str:
        """The backend of this call (``seqmodels.backends.choose``), said once per call key."""
        training = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        key = self.call_key(x, training)
        if (self.impl, key) in self._chosen:
            return self._chosen[self.impl, key].backend

        def measure(candidates: list[str], first: str) -> backends.Choice:
            decision = autotune.choose(key, candidates, first,
                                       autotune.measuring_pass(self, x, state, lengths, training))
            return backends.Choice(decision.impl, decision.source, decision.why())

        choice = backends.choose(self.impl, self.kind, self.first_cell(), x, self.regularizers.active(),
                                 measure if self.autotune else None)
        label, layers = self.key_parts(x)[:2]
        autotune.say(f"seqmodels: {label} {layers}x{self.first_cell().hidden_size} at {autotune.describe(key)} "
                     f"runs on {choice.backend} ({backends.DESCRIPTION[choice.backend]}; impl: {self.impl}, "
                     f"{choice.why()})")
        self.backends[key] = self._chosen[self.impl, key] = choice
        return choice.backend


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
    """The engine of every recurrent module here: torch.nn.RNNBase's interface over the
    registry's cell ``cell_type`` (``seqmodels.nn`` has its call and parameters)."""

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
        at 0 (drawn first, as each cell draws them), the LSTM's forget-gate bias if
        ``forget_bias`` is given. A cell with ``own_init`` in the registry (the RRU) starts as
        its own ``reset_parameters`` sets it instead."""
        if self.kind.own_init:
            self._sync_cells()
            for layer in self._layers:
                layer.cell.reset_parameters()
            return
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for p in self.parameters():
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
        (``load_state_dict(assign=True)``, ``torch.func.functional_call``, ``.to()``), and give it
        this module's train or eval mode (the cells are not submodules; the RRU's dropout reads it)."""
        for layer, suffix in zip(self._layers, self._suffixes):
            layer.cell.training = self.training
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
        out, final = self._compute(x, self._initial_state(hx, x, unbatched), lengths)
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

    def _compute(self, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None):
        """x (T, B, I), state (L·D, B, H) each, lengths or None -> output (T, B, D·H), final
        states: the recurrence in float32 under autocast (module docstring of recurrent.py)."""
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._compute(_float32(x), _float32(state), lengths)
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
                run = None if backend == "autograd" else self.kind.layers[backend]
                # the reverse direction reads a time-reversed copy, unless the loops step backwards themselves
                copy = direction and not (run and run.runs_reverse)
                x_in = reverse_padded(x, lengths) if copy else x
                s0 = tuple(s[i] for s in state)
                if backend == "autograd":  # batch-first, drawing its own masks in the same order
                    out, s = self._layers[i](x_in.transpose(0, 1), s0, mask, self.regularizers, self.training)
                    out = out.transpose(0, 1).contiguous()  # dropout's mask follows memory order: as torch's
                else:
                    cell = self._layers[i].cell
                    weight_hh, rho, zoneout = regularizer_masks(self.regularizers, cell, x.shape[1], x.shape[0], x,
                                                                self.training, len(state))
                    if direction and not copy:  # zoneout's masks are drawn in step order: put them in time order
                        zoneout = tuple(d if d is None else reverse_padded(d, lengths) for d in zoneout)
                    out, s = run(x_in.contiguous(), s0, cell, lengths, weight_hh, rho, zoneout,
                                 **({"reverse": True} if direction and not copy else {}))
                outputs.append(reverse_padded(out, lengths) if copy else out)
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
            batch_first = not x.is_contiguous() and x.transpose(0, 1).is_contiguous()  # a batch-first caller's view
            out, *final = fn(x.transpose(0, 1) if batch_first else x, hx, *args, batch_first)
            return out.transpose(0, 1) if batch_first else out, tuple(final)
        packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
        order, unorder = packed.sorted_indices, packed.unsorted_indices
        hx = tuple(s.index_select(1, order) for s in state)
        out, *final = fn(packed.data, packed.batch_sizes, hx if len(hx) > 1 else hx[0], *args)
        out, _ = pad_packed_sequence(packed._replace(data=out), total_length=x.shape[0])
        return out, tuple(s.index_select(1, unorder) for s in final)



class RecurrentStack(RNNBase):
    """``num_layers`` recurrent layers of a registry cell, batch first, with a tuple state: the
    engine of ``seqmodels.nn`` (``RNNBase``: the same parameters, under torch's names, the same
    backends), with the interface the tasks use (module docstring).

    Cell options (``nonlinearity``, ``forget_bias``, ``peephole``, ``middle_multiplier``,
    ``middle_dropout``) go to the cells that take
    them (the registry says which); setting one for a cell without it is an error. The
    recurrent regularizers (``recurrent_dropout``, ``zoneout_h``, ``zoneout_c``, ``weight_drop``;
    equations in ``RecurrentLayer``) apply to every layer, in training mode. Checkpoints written
    before the parameters took torch's names (``layers.{l}.cell.weight_ih``) still load.
    """

    _NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

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
        middle_multiplier: float = 2.0,
        middle_dropout: float = 0.0,
        impl: str = "auto",
        autotune: bool = True,
        recurrent_dropout: float = 0.0,
        zoneout_h: float = 0.0,
        zoneout_c: float = 0.0,
        weight_drop: float = 0.0,
        bidirectional: bool = False,
    ) -> None:
        options = dict(nonlinearity=nonlinearity, forget_bias=forget_bias, peephole=peephole,
                       middle_multiplier=middle_multiplier, middle_dropout=middle_dropout)
        check_stack_args(cell, input_size, hidden_size, num_layers, dropout, **options)
        object.__setattr__(self, "cell_type", cell)
        own = {k: v for k, v in options.items() if k in CELLS[cell].options}
        super().__init__(input_size, hidden_size, num_layers, True, True, dropout, bidirectional, impl=impl,
                         autotune=autotune, recurrent_dropout=recurrent_dropout, zoneout_h=zoneout_h,
                         zoneout_c=zoneout_c, weight_drop=weight_drop, **own)
        self._register_load_state_dict_pre_hook(_old_parameter_names)

    def extra_repr(self) -> str:
        return f"{self.cell_type!r}, " + super().extra_repr().replace(", batch_first=True", "")

    @property
    def layers(self) -> list[RecurrentLayer]:
        """One ``RecurrentLayer`` per layer and direction; their cells hold this module's parameters."""
        self._sync_cells()
        return self._layers

    @property
    def peephole(self) -> bool:
        return bool(getattr(self.first_cell(), "peephole", False))

    def initial_state(self, batch_size: int, like: Tensor) -> State:
        """Zeros shaped (L·D, B, H), one per state tensor, as torch uses when none is given."""
        rows = self.num_layers * (2 if self.bidirectional else 1)
        return tuple(like.new_zeros(rows, batch_size, self.hidden_size) for _ in self.kind.state)

    def forward(
        self, x: Tensor, state: State | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """x (B, T, I), state tuple of (L·D, B, H) or None, lengths (B,) or None -> output
        (B, T, D·H), final state."""
        if x.dim() != 3:
            raise ValueError(f"expected input of shape (B, T, F), got {tuple(x.shape)}")
        if state is not None and not isinstance(state, tuple):
            raise TypeError(f"state must be a tuple {self.kind.state} of (num_layers, B, H) tensors, "
                            f"got {type(state).__name__}")
        if state is None:
            state = self.initial_state(x.shape[0], x)
        out, final = self._compute(x.transpose(0, 1), state, lengths)
        return out.transpose(0, 1), final

    # ---- torch.nn.RNN / nn.LSTM / nn.GRU state dicts ---------------------------------
    def torch_state_dict(self) -> dict[str, Tensor]:
        """Parameters under torch.nn.RNN / nn.LSTM / nn.GRU names (``weight_ih_l0``, ...)."""
        if self.kind.native_op(self.first_cell()) is None:
            raise ValueError(f"this {self.cell_type} has no torch.nn equivalent (its options: "
                             f"{', '.join(self.kind.options)})")
        return {n: getattr(self, n).detach().clone() for n in self._flat_weights_names}

    def load_torch_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load a torch.nn.RNN / nn.LSTM / nn.GRU state dict (same cell, sizes and layers)."""
        if set(state_dict) != set(self._flat_weights_names):
            raise ValueError(f"state dict keys {sorted(state_dict)} do not match {sorted(self._flat_weights_names)}")
        with torch.no_grad():
            for n in self._flat_weights_names:
                getattr(self, n).copy_(state_dict[n])


def _old_parameter_names(state_dict: dict, prefix: str, *args) -> None:
    """``{prefix}layers.{l}.cell.{name}`` (checkpoints before torch's names) -> ``{prefix}{name}_l{l}``."""
    for key in [k for k in state_dict if k.startswith(prefix + "layers.")]:
        parts = key[len(prefix):].split(".")
        if len(parts) == 4 and parts[2] == "cell":
            state_dict[f"{prefix}{parts[3]}_l{parts[1]}"] = state_dict.pop(key)
