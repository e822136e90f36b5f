"""Many-to-one regression on the sums task."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection

from seqmodels.recurrent import State
from seqmodels.tasks.base import NetworkConfig, SequenceModel


class SumsRegressor(SequenceModel):
    """Many-to-one regression: ŷ = W_y h_T + b_y, loss = mean (ŷ − y)².

    Logs ``{split}/loss``, ``{split}/mse``, ``{split}/mae``; at test time one set per test
    length, ``test/mse_len_{T}`` and ``test/mae_len_{T}``, T read from the batch itself.
    """

    task_name = "sums"  # in W&B run names and tags (seqmodels.tracking)
    reads_whole_sequences = True  # it answers after the last step: a backward direction may help

    def __init__(self, network: NetworkConfig = NetworkConfig(), input_size: int = 1, output_size: int = 1) -> None:
        """input_size: features per step (linked from the data by the CLI)."""
        super().__init__(network, input_size)
        self.save_hyperparameters(logger=False)
        self.head = nn.Linear(network.hidden_size * (2 if network.bidirectional else 1), output_size)
        metrics = MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError()})
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = nn.ModuleDict()  # one MetricCollection per test length

    def forward(self, x: Tensor, state: State | None = None) -> Tensor:
        """x (B, T, I) -> ŷ (B, output_size), read from the last time step (bidirectional: the
        forward direction's last step and the backward direction's, which ends at step 0)."""
        output, _ = self.stack(x, state)
        if self.stack.bidirectional:
            H = self.stack.hidden_size
            return self.head(torch.cat([output[:, -1, :H], output[:, 0, H:]], -1))
        return self.head(output[:, -1])

    def probe_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The loss the diagnostics differentiate: the last step's squared error."""
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        y_hat = self(x)
        loss = nn.functional.mse_loss(y_hat, y)
        self.train_metrics.update(y_hat.detach(), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        y_hat = self(x)
        self.val_metrics.update(y_hat, y)
        self.log("val/loss", nn.functional.mse_loss(y_hat, y), prog_bar=True, sync_dist=True)
        self.log_dict(self.val_metrics)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict:
        """``python cli.py predict``: ŷ and y for every test sequence, keyed by its length."""
        x, y = batch
        T = x.shape[1]
        return {f"y_hat_len_{T}": self(x), f"y_len_{T}": y}

    def _length_metrics(self, T: int) -> nn.ModuleDict:
        """The test metrics of length T, made on first use (lengths come from the batches)."""
        if str(T) not in self.test_metrics:
            self.test_metrics[str(T)] = nn.ModuleDict(
                {"mse": MeanSquaredError(), "mae": MeanAbsoluteError()}).to(self.device)
        return self.test_metrics[str(T)]

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        T = x.shape[1]
        y_hat = self(x)
        for name, metric in self._length_metrics(T).items():
            metric.update(y_hat, y)
            self.log(f"test/{name}_len_{T}", metric, metric_attribute=f"test_metrics.{T}.{name}",
                     add_dataloader_idx=False)
