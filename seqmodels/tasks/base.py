"""LightningModules: one shared base (the recurrent stack, the optimizer fallback) and one
small module per task. A task knows nothing of how a cell is computed.

Metric names: ``{split}/loss`` for train/val/test, then task metrics such as ``val/mse``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from lightning.pytorch import LightningModule

from seqmodels.errors import ConfigError
from seqmodels.recurrent import RecurrentStack
from seqmodels.registry import CELLS

RECURRENT_INITS = ("default", "identity", "orthogonal")
# the allowed values come from the registry and the stack, so `--help` lists them and a new cell
# needs no edit here
CellName = Literal[tuple(CELLS)]


@torch.no_grad()
def init_recurrent_weights(stack: RecurrentStack, kind: str, gain: float) -> None:
    """W_hh = gain · I (identity) or gain · Q with Q orthogonal, per (H, H) gate block."""
    if stack.layers[0].cell.weight_hh.shape[0] % stack.hidden_size:
        raise ConfigError(f"model.network.recurrent_init: {kind} needs W_hh in blocks of hidden_size rows; cell: "
                          f"{stack.cell_type}'s are {stack.layers[0].cell.weight_hh.shape[0]} rows: use default")
    for layer in stack.layers:
        for block in layer.cell.weight_hh.split(stack.hidden_size):  # one per gate of the registry
            if kind == "identity":
                block.copy_(torch.eye(stack.hidden_size) * gain)
            else:
                torch.nn.init.orthogonal_(block, gain=gain)


@dataclass(frozen=True)
class NetworkConfig:
    """The recurrent stack of every task, in one place (``model.init_args.network`` in a config).

    Args:
        cell: a cell of the registry (``seqmodels.cells.CELLS``).
        hidden_size, num_layers: the stack's size.
        dropout: between stacked layers, in [0, 1) (the text model also applies it to its
            embedding and before its read-out).
        impl: how the recurrence is computed (``seqmodels.backends``): auto, torch, cpp, reference, autograd, triton
            (``triton``: experimental); ``auto`` picks the fastest proven one.
        autotune: with ``impl: auto``, time the candidates on the first call at each new
            shape and keep the fastest (``seqmodels.autotune``, cached on disk); false: the
            first candidate.
        nonlinearity: the vanilla RNN's.
        forget_bias: the LSTM's initial forget-gate bias.
        peephole: LSTM with peephole connections.
        middle_multiplier, middle_dropout: the RRU's middle layer, its width as a multiple of
            input + hidden size, and the dropout on it (a fresh mask each step).
        recurrent_init: every W_hh (each gate block): ``default`` (torch's uniform),
            ``identity`` (IRNN, Le et al. 2015) or ``orthogonal``, times ``recurrent_gain``.
        recurrent_dropout, zoneout_h, zoneout_c, weight_drop: regularizers inside the
            recurrence, each a probability in [0, 1) (0: off; equations in
            ``seqmodels.recurrent.RecurrentLayer``); not with ``impl: torch``.
        bidirectional: a second direction per layer, reading each sequence backwards; only
            for a task that reads a whole sequence before it answers (sums). The text and
            music models predict the next step, which a backward direction would see: they
            refuse it.
    """

    cell: CellName = "lstm"
    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.0
    impl: str = "auto"
    autotune: bool = True
    nonlinearity: Literal["tanh", "relu"] = "tanh"
    forget_bias: float = 1.0
    peephole: bool = False
    middle_multiplier: float = 2.0
    middle_dropout: float = 0.0
    recurrent_init: Literal["default", "identity", "orthogonal"] = "default"
    recurrent_gain: float = 1.0
    recurrent_dropout: float = 0.0
    zoneout_h: float = 0.0
    zoneout_c: float = 0.0
    weight_drop: float = 0.0
    bidirectional: bool = False


class SequenceModel(LightningModule):
    """Base for every task: builds ``self.stack`` (a RecurrentStack) from ``network`` with the
    input size the task gives it. A task adds its input and output layers, its loss and its
    metrics, and nothing else.

    The optimizer and LR scheduler come from the CLI (``optimizer:`` / ``lr_scheduler:``
    in the config); ``configure_optimizers`` here is only the fallback (Adam, lr 1e-3)
    for use without the CLI.
    """

    task_name: str | None = None  # the task in W&B run names and tags; None: the class name
    reads_whole_sequences = False  # True: it answers after the whole sequence (bidirectional fits)

    def __init__(self, network: NetworkConfig, input_size: int) -> None:
        super().__init__()
        if isinstance(network, dict):  # as a checkpoint's hyperparameters hold it
            network = NetworkConfig(**network)
        self.network = network
        self._logged_backends: set[str] = set()
        options = asdict(network)
        if network.bidirectional and not self.reads_whole_sequences:
            raise ConfigError(f"model.network.bidirectional: true does not fit {type(self).__name__}: it predicts "
                              "each next step from the past, which a backward direction would see; use false")
        init, gain = options.pop("recurrent_init"), options.pop("recurrent_gain")
        try:
            self.stack = RecurrentStack(input_size=input_size, **options)
        except ConfigError as err:
            raise ConfigError(f"model.network.{err}") from None
        if init not in RECURRENT_INITS:
            raise ConfigError(f"model.network.recurrent_init must be one of {list(RECURRENT_INITS)}, got {init!r}")
        if init != "default":
            init_recurrent_weights(self.stack, init, gain)

    def save_hyperparameters(self, *args, **kwargs) -> None:  # noqa: D102
        """Lightning's, with the network as a plain dict: checkpoints stay loadable with
        ``weights_only=True`` (no classes of this package inside)."""
        super().save_hyperparameters(*args, **kwargs)
        if isinstance(self.hparams.get("network"), NetworkConfig):
            self.hparams["network"] = asdict(self.hparams["network"])

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """The backend each new call of the stack ran on (``seqmodels.backends``) goes to the
        loggers once (W&B: the run's config, beside ``model.network.impl``); the console has
        had its line from the stack."""
        new = {k: c for k, c in self.stack.backends.items() if k not in self._logged_backends}
        if new and self.trainer is not None:
            key, choice = list(new.items())[-1]
            for logger in self.loggers:
                logger.log_hyperparams({"model.backend": choice.backend, "model.backend_why": f"{key}: {choice.why()}"})
            self._logged_backends.update(new)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)
