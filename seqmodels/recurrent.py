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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

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


class RecurrentStack(ChoosesBackend, compat.FlattenOnApply, nn.Module):
    """``num_layers`` recurrent layers with dropout between them (not after the last).

    Parameter names: ``layers.{l}.cell.weight_ih`` etc.; ``torch_state_dict`` /
    ``load_torch_state_dict`` convert to and from torch.nn.RNN / nn.LSTM / nn.GRU names
    (``weight_ih_l{l}``), so weights move freely between the two.

    Cell options (``nonlinearity``, ``forget_bias``, ``peephole``) go to the cells that take
    them (the registry says which); setting one for a cell without it is an error. The
    recurrent regularizers (``recurrent_dropout``, ``zoneout_h``, ``zoneout_c``, ``weight_drop``;
    equations in ``RecurrentLayer``) apply to every layer, in training mode.
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
        autotune: bool = True,
        recurrent_dropout: float = 0.0,
        zoneout_h: float = 0.0,
        zoneout_c: float = 0.0,
        weight_drop: float = 0.0,
    ) -> None:
        super().__init__()
        options = dict(nonlinearity=nonlinearity, forget_bias=forget_bias, peephole=peephole)
        check_stack_args(cell, input_size, hidden_size, num_layers, dropout, **options)
        self.kind = CELLS[cell]
        self.cell_type, self.hidden_size, self.num_layers = cell, hidden_size, num_layers
        self.dropout, self.autotune = dropout, autotune
        own = {k: v for k, v in options.items() if k in self.kind.options}
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.layers = nn.ModuleList(RecurrentLayer(self.kind.cell(i, hidden_size, **own)) for i in sizes)
        self.regularizers = Regularizers(recurrent_dropout, zoneout_h, zoneout_c, weight_drop)
        check_regularizers(self.regularizers, self.kind, cell)
        self.impl = impl

    def first_cell(self) -> nn.Module:
        return self.layers[0].cell

    @property
    def peephole(self) -> bool:
        return bool(getattr(self.layers[0].cell, "peephole", False))

    def initial_state(self, batch_size: int, like: Tensor) -> State:
        """Zeros shaped (num_layers, B, H), one per state tensor, as torch uses when none is given."""
        return tuple(like.new_zeros(self.num_layers, batch_size, self.hidden_size) for _ in self.kind.state)

    def forward(
        self, x: Tensor, state: State | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """x (B, T, I), state tuple of (num_layers, B, H) or None, lengths (B,) or None ->
        output (B, T, H), final state."""
        if x.dim() != 3:
            raise ValueError(f"expected input of shape (B, T, F), got {tuple(x.shape)}")
        if state is not None and not isinstance(state, tuple):
            raise TypeError(f"state must be a tuple {self.kind.state} of (num_layers, B, H) tensors, "
                            f"got {type(state).__name__}")
        if torch.is_autocast_enabled(x.device.type):  # float32 recurrence (module docstring)
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(_float32(x), None if state is None else _float32(state), lengths)
        if state is None:
            state = self.initial_state(x.shape[0], x)
        return self.run_backend(self.backend_for(x, state, lengths), x, state, lengths)

    def key_parts(self, x: Tensor) -> tuple[str, int, int, int]:
        """(label, layers, batch, steps) of a call (``ChoosesBackend.call_key``); x is (B, T, I)."""
        return self.cell_type, self.num_layers, x.shape[0], x.shape[1]

    def run_backend(self, backend: str, x: Tensor, state: State, lengths: Tensor | None) -> tuple[Tensor, State]:
        """The stack through one backend (``backend_for`` picks it)."""
        if backend == "torch":
            return self._forward_native(x, state, lengths)
        if backend in backends.HANDWRITTEN:
            return self._forward_handwritten(self.kind.layers[backend], x, state, lengths)
        if backend != "autograd":
            raise ValueError(f"unknown backend {backend!r}; one of {backends.BACKENDS}")
        mask = None
        if lengths is not None:
            mask = torch.arange(x.shape[1], device=x.device) < lengths.to(x.device).unsqueeze(1)
        finals = []
        for l, layer in enumerate(self.layers):
            if l > 0 and self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
            x, s = layer(x, tuple(s[l] for s in state), mask, self.regularizers, self.training)
            finals.append(s)
        return x, tuple(torch.stack(s) for s in zip(*finals))

    # ---- hand-written BPTT, one autograd.Function call per layer ---------------------
    def _forward_handwritten(self, run_layer, x: Tensor, state: State, lengths: Tensor | None) -> tuple[Tensor, State]:
        """Time-major inside (per-step slices contiguous); dropout between layers stays here."""
        if lengths is not None:
            lengths = lengths.to(x.device, torch.long).clamp(0, x.shape[1])
        x = x.transpose(0, 1).contiguous()
        finals = []
        for l, layer in enumerate(self.layers):
            if l > 0 and self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
            # weight drop: the masked W_hh goes in, and autograd takes dW back through the mask
            weight_hh, recurrent, zoneout = regularizer_masks(self.regularizers, layer.cell, x.shape[1], x.shape[0],
                                                              x, self.training, len(state))
            x, s = run_layer(x, tuple(s[l] for s in state), layer.cell, lengths, weight_hh, recurrent, zoneout)
            finals.append(s)
        return x.transpose(0, 1), tuple(torch.stack(s) for s in zip(*finals))

    # ---- native kernels on the same parameters -------------------------------------
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(layer.cell, n) for layer in self.layers for n in self._NAMES]

    def flatten_parameters(self) -> None:
        """On a GPU, make the weights that the native path hands to cuDNN views of one buffer in
        cuDNN's layout, as ``torch.nn.LSTM.flatten_parameters`` does: cuDNN then runs on the
        module's own parameters, with no per-call copy and no "not part of single contiguous
        chunk of memory" warning. Values, names and Parameter objects stay; no-op on CPU."""
        op = self.kind.native_op(self.layers[0].cell)
        weights = self._flat_weights()
        if op is None or compat.cudnn_is_flat(weights) or not compat.cudnn_can_flatten(weights):
            return  # the cheap check first: on a GPU this runs before every native call
        compat.cudnn_flatten_(weights, len(self._NAMES), self.layers[0].cell.input_size, op.upper(),
                              self.hidden_size, self.num_layers)

    def _forward_native(self, x: Tensor, state: State, lengths: Tensor | None) -> tuple[Tensor, State]:
        """torch.nn.RNN / nn.LSTM / nn.GRU's own op (``compat.native_rnn_op``), on this module's parameters."""
        if x.is_cuda:
            self.flatten_parameters()  # a no-op once flat; covers modules built on the GPU
        fn = compat.native_rnn_op(self.kind.native_op(self.layers[0].cell))
        pack = (lambda s: s) if len(state) > 1 else (lambda s: s[0])  # torch: (h, c), or h alone
        args = (self._flat_weights(), True, self.num_layers, self.dropout, self.training, False)
        if lengths is None:
            out, *final = fn(x, pack(state), *args, True)
            return out, tuple(final)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        order, unorder = packed.sorted_indices, packed.unsorted_indices
        out, *final = fn(packed.data, packed.batch_sizes, pack(tuple(s.index_select(1, order) for s in state)), *args)
        out, _ = pad_packed_sequence(packed._replace(data=out), batch_first=True, total_length=x.shape[1])
        return out, tuple(s.index_select(1, unorder) for s in final)

    # ---- torch.nn.RNN / nn.LSTM / nn.GRU state dicts ---------------------------------
    _NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

    def torch_state_dict(self) -> dict[str, Tensor]:
        """Parameters under torch.nn.RNN / nn.LSTM / nn.GRU names (``weight_ih_l0``, ...)."""
        if self.kind.native_op(self.layers[0].cell) is None:
            raise ValueError(f"this {self.cell_type} has no torch.nn equivalent (its options: "
                             f"{', '.join(self.kind.options)})")
        return {f"{n}_l{l}": getattr(layer.cell, n).detach().clone()
                for l, layer in enumerate(self.layers) for n in self._NAMES}

    def load_torch_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load a torch.nn.RNN / nn.LSTM / nn.GRU state dict (same cell, sizes and layers)."""
        expected = {f"{n}_l{l}" for l in range(self.num_layers) for n in self._NAMES}
        if set(state_dict) != expected:
            raise ValueError(f"state dict keys {sorted(state_dict)} do not match {sorted(expected)}")
        with torch.no_grad():
            for l, layer in enumerate(self.layers):
                for n in self._NAMES:
                    getattr(layer.cell, n).copy_(state_dict[f"{n}_l{l}"])
