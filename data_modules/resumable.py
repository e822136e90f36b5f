"""Training loaders that resume mid-epoch and split the data across DDP ranks.

Every training DataLoader is a ``torchdata`` ``StatefulDataLoader`` (``ResumableLoader``): Lightning saves its
position in each checkpoint and restores it on ``--ckpt_path``, so a resumed run continues
with the next batch of the same epoch. What each epoch draws is a pure function of
``(seed, epoch)`` (never of torch's global generator), so the resumed run draws the same.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from seqmodels import compat


class ResumableLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` whose state, once the epoch's last batch is out, is that of a
    fresh loader: a checkpoint taken at or after an epoch's last batch (``LastCheckpoint``'s
    end-of-epoch save) resumes at the first batch of the next epoch (Lightning moves to the
    next epoch; the plain state would make the resumed loader yield an empty epoch first)."""

    def state_dict(self) -> dict:
        state = super().state_dict()
        try:
            finished = compat.batches_yielded(state) >= len(self)
        except TypeError:  # no length: cannot tell, keep the position
            finished = False
        return {} if finished else state


def rank_and_world(datamodule) -> tuple[int, int]:
    """(global rank, world size) of the datamodule's trainer; (0, 1) without one."""
    trainer = getattr(datamodule, "trainer", None)
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def epoch_of(datamodule) -> Callable[[], int]:
    """A function giving the trainer's current epoch at the time it is called (0 without one)."""
    def current_epoch() -> int:
        trainer = getattr(datamodule, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0
    return current_epoch


class EpochSampler(DistributedSampler):
    """torch's ``DistributedSampler`` (this rank's share of a permutation seeded by ``seed +
    epoch``) reading the epoch from the trainer when an epoch starts. Lightning's own
    ``set_epoch`` call passes one epoch too many after a resume from a checkpoint taken at an
    epoch's last batch (2.6: the restore counts that epoch as processed twice), which would
    skip an epoch's permutation; ``trainer.current_epoch`` is right in that case too."""

    def __init__(self, dataset: Dataset, epoch: Callable[[], int], num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.current_epoch = epoch

    def __iter__(self):
        self.epoch = self.current_epoch()
        return super().__iter__()


def shuffled_loader(dataset: Dataset, datamodule, batch_size: int, seed: int,
                    collate_fn: Optional[Callable] = None, num_workers: int = 0) -> ResumableLoader:
    """Shuffled batches of this rank's share of ``dataset`` (``EpochSampler``), also with one
    process, so that the order never depends on the global generator."""
    rank, world = rank_and_world(datamodule)
    sampler = EpochSampler(dataset, epoch_of(datamodule), num_replicas=world, rank=rank, seed=seed)
    return ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                           num_workers=num_workers, persistent_workers=num_workers > 0,
                           generator=torch.Generator().manual_seed(seed))
