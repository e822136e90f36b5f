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

from torch.nn import *  # noqa: F401,F403 - everything else is torch.nn's: `import seqmodels.nn as nn` swaps a script
from torch.nn import functional, init, parameter, utils  # noqa: F401 - and its submodules, as torch.nn has them

from seqmodels.recurrent import RNNBase  # the engine, shared with the tasks (RecurrentStack)


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
