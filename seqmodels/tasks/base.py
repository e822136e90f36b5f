"""LightningModules: one shared base (stack, optimizer fallback, sampling hook) and one
small module per task. A task knows nothing of how a cell is computed.

Metric names: ``{split}/loss`` for train/val/test, then task metrics such as ``val/mse``.
"""
from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, LightningModule

from seqmodels.errors import ConfigError
from seqmodels.recurrent import RecurrentStack


RECURRENT_INITS = ("default", "identity", "orthogonal")


@torch.no_grad()
def init_recurrent_weights(stack: RecurrentStack, kind: str, gain: float) -> None:
    """W_hh = gain · I (identity) or gain · Q with Q orthogonal, per (H, H) gate block."""
    for layer in stack.layers:
        w = layer.cell.weight_hh
        for block in w.split(w.shape[1]):
            if kind == "identity":
                block.copy_(torch.eye(w.shape[1]) * gain)
            else:
                torch.nn.init.orthogonal_(block, gain=gain)


class SequenceModel(LightningModule):
    """Base for every task: owns ``self.stack`` (a RecurrentStack) and the shared plumbing.

    Args:
        cell: ``rnn`` or ``lstm``.
        input_size: features per time step (set by the data for most tasks).
        hidden_size, num_layers: stack size.
        dropout: between stacked layers, in [0, 1).
        impl: ``auto``, ``autograd``, ``native`` (see ``seqmodels.recurrent``).
        nonlinearity: ``tanh`` or ``relu`` (vanilla RNN only).
        forget_bias: initial forget-gate bias (LSTM only).
        peephole: LSTM with peephole connections.
        recurrent_init: ``default`` (torch's uniform), ``identity`` (IRNN, Le et al. 2015) or
            ``orthogonal``, for every W_hh (each gate block for the LSTM), times ``recurrent_gain``.

    The optimizer and LR scheduler come from the CLI (``optimizer:`` / ``lr_scheduler:``
    in the config); ``configure_optimizers`` here is only the fallback (Adam, lr 1e-3)
    for use without the CLI.
    """

    def __init__(
        self,
        cell: str = "lstm",
        input_size: int = 1,
        hidden_size: int = 64,
        num_layers: int = 1,
        dropout: float = 0.0,
        impl: str = "auto",
        nonlinearity: str = "tanh",
        forget_bias: float = 1.0,
        peephole: bool = False,
        recurrent_init: str = "default",
        recurrent_gain: float = 1.0,
    ) -> None:
        super().__init__()
        try:
            self.stack = RecurrentStack(cell, input_size, hidden_size, num_layers, dropout,
                                        nonlinearity, forget_bias, peephole, impl)
        except ConfigError as err:
            raise ConfigError(f"model.{err}") from None
        if recurrent_init not in RECURRENT_INITS:
            raise ConfigError(f"model.recurrent_init must be one of {list(RECURRENT_INITS)}, got {recurrent_init!r}")
        if recurrent_init != "default":
            init_recurrent_weights(self.stack, recurrent_init, recurrent_gain)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def sample(self, datamodule: LightningDataModule | None, *, prime: str | None,
               prime_frames: int, length: int, temperature: float, top_k: int, seed: int,
               output: str) -> str:
        """Generate (``python cli.py sample``); returns what to print. Generative tasks override it."""
        raise ConfigError(f"{type(self).__name__} does not generate; `sample` works with the "
                          "text and music models")
