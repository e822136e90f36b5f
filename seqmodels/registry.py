"""The cell registry: one entry per cell, everything the rest of the code needs to know about it.

The stack, the decision of how a recurrence runs (``seqmodels.backends``), the CLI's choices,
``benchmarks/cells.py`` and the generic tests (``tests/test_cells.py`` and the others that
parametrize over ``CELLS``) all ask this registry. A new cell is a class (``cells.py`` or
anywhere) and one entry here; with a hand-written backward, its layer functions in ``bptt/``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn

from seqmodels import bptt
from seqmodels.cells import GRUCell, LSTMCell, RNNCell, RRUCell

# Regularizers inside the recurrence (equations in ``recurrent.RecurrentLayer``), each a
# probability in [0, 1). autograd and every hand-written backward apply them all; torch's fused
# ops none.
REGULARIZERS = ("recurrent_dropout", "zoneout_h", "zoneout_c", "weight_drop")


@dataclass(frozen=True)
class CellType:
    """One kind of cell.

    cell        the class: ``cell(input_size, hidden_size, **options)``, one step
                ``cell(x, state, weight_hh=None, recurrent_mask=None) -> state``, parameters
                ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh`` under torch's names
    gates       the blocks stacked in weight_ih / weight_hh, in torch's order: H rows each
                (the RRU's one block j has its own width)
    state       names of the state tensors, h first
    options     the cell's own constructor options (beyond the sizes) and their defaults
    torch_twin  options -> (the torch.nn module that computes the same function, its keyword
                arguments), or None when torch has none for these options. The twin's fused
                op (oneDNN, cuDNN) is ``impl: torch``, and the generic tests compare with it.
    layers      the hand-written backward through time: backend (``reference``, ``cpp``,
                ``triton``) -> layer function (``bptt/__init__.py``); empty: autograd only
    variants    option sets the generic checks cover (besides the defaults)
    own_init    False: the parameters start as torch.nn.RNN / LSTM / GRU's, U(−1/√H, 1/√H); True:
                as the cell's ``reset_parameters`` sets them (a cell unlike torch's)
    """

    cell: type[nn.Module]
    gates: tuple[str, ...]
    state: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    torch_twin: Callable[[dict], Optional[tuple[type[nn.Module], dict]]] = lambda options: None
    layers: dict[str, Callable] = field(default_factory=dict)
    variants: tuple[dict, ...] = ()
    own_init: bool = False

    def options_of(self, cell: nn.Module) -> dict:
        """The options a built cell was made with."""
        return {name: getattr(cell, name) for name in self.options}

    def twin(self, cell: nn.Module) -> Optional[tuple[type[nn.Module], dict]]:
        return self.torch_twin(self.options_of(cell))

    def native_op(self, cell: nn.Module) -> Optional[str]:
        """The name of the twin's fused op (``torch._VF.<name>``), or None."""
        twin = self.twin(cell)
        if twin is None:
            return None
        module, kwargs = twin
        return {nn.LSTM: "lstm", nn.GRU: "gru"}.get(module) or f"rnn_{kwargs.get('nonlinearity', 'tanh')}"

    def all_variants(self) -> tuple[dict, ...]:
        """The defaults, then every listed variant."""
        return ({},) + tuple(v for v in self.variants if v)


CELLS: dict[str, CellType] = {
    "rnn": CellType(RNNCell, ("z",), ("h",), {"nonlinearity": "tanh"},
                    torch_twin=lambda o: (nn.RNN, {"nonlinearity": o["nonlinearity"]}),
                    layers=bptt.LAYERS["rnn"], variants=({"nonlinearity": "relu"},)),
    "lstm": CellType(LSTMCell, ("i", "f", "g", "o"), ("h", "c"), {"forget_bias": 1.0, "peephole": False},
                     torch_twin=lambda o: None if o["peephole"] else (nn.LSTM, {}),
                     layers=bptt.LAYERS["lstm"], variants=({"peephole": True},)),
    "gru": CellType(GRUCell, ("r", "z", "n"), ("h",), torch_twin=lambda o: (nn.GRU, {}), layers=bptt.LAYERS["gru"]),
    # autograd only: no hand-written backward yet (docs/models.md says what it costs)
    "rru": CellType(RRUCell, ("j",), ("h", "c"), {"middle_multiplier": 2.0, "middle_dropout": 0.0},
                    variants=({"middle_multiplier": 0.5},), own_init=True),
}
