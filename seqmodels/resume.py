"""Exact resume: what a checkpoint must hold beyond Lightning's own state so that a killed
run, resumed with ``--ckpt_path last``, computes the very same steps as one never killed.

``LastCheckpoint`` writes ``last.ckpt`` every N training steps and at the end of every epoch.
Lightning restores the weights, the optimizer, the LR scheduler, the loop counters and (for
``torchdata``'s ``StatefulDataLoader``) the position inside the epoch. This adds the random
number generators (dropout masks), through the ``ExactResume`` callback, which also puts the
logging step back where the uninterrupted run had it. The carried TBPTT
state lives with the text model (``CharLanguageModel.on_save_checkpoint``).
"""
from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from seqmodels import compat


def collect_rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python generator states, as tensors, ints and tuples
    only, so that checkpoints stay loadable with ``torch.load(weights_only=True)``."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])),
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """The inverse of ``collect_rng_states``."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, key, *rest = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def _plain(value):
    return value.item() if hasattr(value, "item") else value


class ExactResume(Callback):
    """Puts the random generators' states into every checkpoint and, on resume, restores them
    right before the first training batch, where the uninterrupted run had them.

    It also sets Lightning's logging step (``compat.set_logging_step``) to the global step on
    resume: Lightning 2.6 adds one too many after a checkpoint taken at the end of an epoch,
    which shifts every later point of the W&B/CSV curves by one step.

    Restoring the generators any earlier would not do: between loading the checkpoint and the first batch
    Lightning and the DataLoader may draw numbers the uninterrupted run drew before saving.
    Under DDP every rank's torch state is gathered into the checkpoint and each rank gets its
    own back (with the same number of processes; otherwise each rank keeps its fresh seed).
    """

    def __init__(self) -> None:
        self._trainer: Optional[Trainer] = None
        self._pending: Optional[dict[str, Any]] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        states = collect_rng_states()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:  # every rank calls this: a collective is safe
            states["torch_per_rank"] = trainer.strategy.all_gather(states["torch"]).cpu()
        return states

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        compat.set_logging_step(trainer, trainer.global_step)  # one logged step per step
        per_rank = states.pop("torch_per_rank", None)
        if trainer.world_size > 1:
            if per_rank is None or len(per_rank) != trainer.world_size:
                return  # another number of processes: the random streams cannot continue
            states["torch"] = per_rank[trainer.global_rank].clone()
        set_rng_states(states)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` (the checkpoint ``--ckpt_path last`` resumes from) every
    ``every_n_train_steps`` optimizer steps, at the end of every ``every_n_epochs``-th epoch
    (after its validation; 0: never at epoch ends, for runs whose epochs take seconds) and at
    the end of training. No other files: the best checkpoints are another
    ``ModelCheckpoint``'s job, with ``save_last: false`` so that there is one ``last.ckpt``;
    list this one after it, so that an end-of-epoch ``last.ckpt`` already holds the epoch's best.

    The step-count save skips an epoch's last batch when an end-of-epoch save follows moments
    later, after the validation: that is the state Lightning resumes cleanly (resuming from
    the last batch itself would skip the epoch's validation).
    """

    def __init__(self, every_n_train_steps: int = 100, every_n_epochs: int = 1, dirpath: Optional[str] = None) -> None:
        if every_n_train_steps < 1:
            raise ValueError(f"LastCheckpoint every_n_train_steps must be >= 1, got {every_n_train_steps}")
        if every_n_epochs < 0:
            raise ValueError(f"LastCheckpoint every_n_epochs must be >= 0 (0: not at epoch ends), got {every_n_epochs}")
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, save_top_k=0,
                         save_last=True, save_on_train_epoch_end=True)
        self.epoch_interval = every_n_epochs

    def _saves_at_epoch_end(self, trainer: Trainer) -> bool:
        return self.epoch_interval > 0 and (trainer.current_epoch + 1) % self.epoch_interval == 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not (trainer.fit_loop.epoch_loop.batch_progress.is_last_batch and self._saves_at_epoch_end(trainer)):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._saves_at_epoch_end(trainer):
            self._save_unless_saved(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save_unless_saved(trainer)

    def _save_unless_saved(self, trainer: Trainer) -> None:
        compat.save_last_checkpoint(self, trainer)
