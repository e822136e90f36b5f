"""Synthetic sums: x_1..x_T drawn i.i.d., target y = Σ_t x_t (many-to-one regression).

Deterministic from ``seed``: every split is drawn by numpy's PCG64 from the seed sequence
``[seed, split, length]``, which gives the same numbers on every machine and every run.
Test sets come one per length in ``test_lengths`` (the length-generalization experiment).
"""
from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from data_modules.resumable import ResumableLoader, shuffled_loader

from seqmodels.errors import ConfigError

DISTRIBUTIONS = ("uniform", "normal")
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def make_sums(n: int, length: int, seed: int, split: str, distribution: str = "uniform",
              low: float = -1.0, high: float = 1.0, std: float = 1.0) -> TensorDataset:
    """n sequences x of shape (n, length, 1), float32, and targets y = x.sum(1) of shape (n, 1)."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], length])
    if distribution == "uniform":
        x = rng.uniform(low, high, size=(n, length, 1))
    else:
        x = rng.normal(0.0, std, size=(n, length, 1))
    x = torch.from_numpy(x.astype(np.float32))
    return TensorDataset(x, x.sum(dim=1))


class SumsDataModule(LightningDataModule):
    """Train/val at ``seq_len``; one test dataloader per length in ``test_lengths``.

    Args:
        seq_len: training and validation length T.
        test_lengths: test lengths; metrics are named ``test/mse_len_{T}``.
        train_size, val_size, test_size: number of sequences per split (test: per length).
        distribution: ``uniform`` on [low, high] or ``normal`` with mean 0 and ``std``.
        seed: the data seed (independent of ``seed_everything``).
    """

    output_size = 1

    def __init__(
        self,
        seq_len: int = 20,
        test_lengths: list[int] = [5, 10, 20, 40, 100],  # noqa: B006 (shown as-is by --help)
        train_size: int = 10_000,
        val_size: int = 1_000,
        test_size: int = 1_000,
        batch_size: int = 64,
        distribution: str = "uniform",
        low: float = -1.0,
        high: float = 1.0,
        std: float = 1.0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name in ("seq_len", "train_size", "val_size", "test_size", "batch_size"):
            value = locals()[name]
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{name} must be an integer >= 1, got {value!r}")
        if not test_lengths:
            raise ConfigError("data.test_lengths must list at least one length, e.g. [5, 10, 20, 40, 100]")
        if any(not isinstance(t, int) or t < 1 for t in test_lengths):
            raise ConfigError(f"data.test_lengths must all be integers >= 1, got {list(test_lengths)}")
        if distribution not in DISTRIBUTIONS:
            raise ConfigError(f"data.distribution must be one of {list(DISTRIBUTIONS)}, got {distribution!r}")
        if distribution == "uniform" and not low < high:
            raise ConfigError(f"data.low must be < data.high, got low={low}, high={high}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters(logger=False)  # the CLI logs the whole config once
        self.seq_len, self.test_lengths = seq_len, list(test_lengths)
        self.batch_size, self.num_workers = batch_size, num_workers

    @property
    def input_size(self) -> int:
        """Features per time step (one number): linked into the model by the CLI."""
        return 1

    @property
    def target_variance(self) -> float:
        """Var(Σ x_t) = T · Var(x): T (high-low)^2 / 12 for uniform, T std^2 for normal."""
        hp = self.hparams
        var = (hp.high - hp.low) ** 2 / 12 if hp.distribution == "uniform" else hp.std**2
        return self.seq_len * var

    def _make(self, n: int, length: int, split: str) -> TensorDataset:
        hp = self.hparams
        return make_sums(n, length, hp.seed, split, hp.distribution, hp.low, hp.high, hp.std)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit"):
            self.train_set = self._make(hp.train_size, self.seq_len, "train")
        if stage in (None, "fit", "validate"):
            self.val_set = self._make(hp.val_size, self.seq_len, "val")
        if stage in (None, "test", "predict"):
            self.test_sets = [self._make(hp.test_size, t, "test") for t in self.test_lengths]

    def _loader(self, dataset: TensorDataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled by (seed, epoch), this rank's share under DDP, resumable mid-epoch."""
        return shuffled_loader(self.train_set, self, self.batch_size, self.hparams.seed,
                               num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(d) for d in self.test_sets]

    def predict_dataloader(self) -> list[DataLoader]:
        return self.test_dataloader()
