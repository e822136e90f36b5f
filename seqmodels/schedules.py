"""A learning-rate schedule stepped per optimizer step and sized to the whole run.

    lr_t = lr · w_t · (r + (1 − r) · ½(1 + cos(π · p_t))),   w_t = min(1, (t + 1) / W)

with W warm-up steps, r the final fraction of the peak lr and p_t ∈ [0, 1] the progress of the
run: t / S for S total steps, and, when the Trainer has a time limit (``max_time``), the larger
of t / S and the share of that time already spent. So the cosine reaches its floor when the run
ends, by steps or by the clock, whatever the dataset size and the machine's speed.

``total_steps: null`` (the default) takes S from the Trainer (``estimated_stepping_batches``:
max_epochs × batches per epoch / accumulation, or max_steps). The CLI steps it every optimizer
step (``interval: step``), or with ``interval: epoch`` at every epoch start, t then being the
steps done so far: without warm-up that is torch's ``CosineAnnealingLR`` with T_max =
max_epochs, to float rounding, but sized to the run by itself. A clock-driven schedule depends on the machine's speed, so runs with
``max_time`` are not bit-reproducible (they never are: where they stop depends on it too).

    lr_scheduler:
      class_path: seqmodels.schedules.WarmupCosineLR
      init_args: {warmup_steps: 100, final_fraction: 0.0}
"""
from __future__ import annotations

import math
from typing import Callable, Literal

from lightning.pytorch.callbacks import Timer
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from seqmodels.errors import ConfigError


class WarmupCosineLR(LRScheduler):
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``final_fraction`` × lr at the
    end of the run (``total_steps``, or the Trainer's steps and time limit: see :func:`size_to_trainer`)."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 100, total_steps: int | None = None,
                 final_fraction: float = 0.0, interval: Literal["step", "epoch"] = "step",
                 last_epoch: int = -1) -> None:
        if warmup_steps < 0:
            raise ConfigError(f"lr_scheduler.warmup_steps must be >= 0, got {warmup_steps}")
        if total_steps is not None and total_steps < 1:
            raise ConfigError(f"lr_scheduler.total_steps must be >= 1 (or null: the Trainer's number of steps), got {total_steps}")
        if not 0.0 <= final_fraction <= 1.0:
            raise ConfigError(f"lr_scheduler.final_fraction is a fraction of the peak lr, in [0, 1]; got {final_fraction}")
        if interval not in ("step", "epoch"):
            raise ConfigError(f"lr_scheduler.interval must be 'step' or 'epoch', got {interval!r}")
        self.warmup_steps, self.total_steps, self.final_fraction = warmup_steps, total_steps, final_fraction
        self.interval = interval
        self.time_fraction: Callable[[], float] | None = None  # share of the time budget spent
        self.steps_done: Callable[[], int] | None = None  # interval epoch: the Trainer's global step
        super().__init__(optimizer, last_epoch)

    def progress(self, step: int) -> float:
        """p_t = max(t / S, time spent / time limit), clipped to [0, 1]."""
        p = min(step, self.total_steps) / self.total_steps if self.total_steps else 0.0
        if self.time_fraction is not None:
            p = max(p, self.time_fraction())
        return min(max(p, 0.0), 1.0)

    def factor(self, step: int) -> float:
        """w_t · (r + (1 − r) · ½(1 + cos(π · p_t)))."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        r = self.final_fraction
        return warm * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * self.progress(step))))

    def get_lr(self) -> list[float]:
        step = self.steps_done() if self.steps_done is not None else self.last_epoch
        factor = self.factor(step)  # once per call: it may ask the clock (a broadcast)
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("time_fraction", None)  # closures over the Trainer: re-attached on every fit
        state.pop("steps_done", None)
        return state


def size_to_trainer(scheduler: WarmupCosineLR, trainer) -> None:
    """Fill in S from the Trainer when the config left it null, and follow the Trainer's time
    limit if it has one (the fraction is broadcast from rank 0, so all DDP ranks agree)."""
    steps = trainer.estimated_stepping_batches
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer) and c.time_remaining() is not None), None)
    if scheduler.total_steps is None and math.isfinite(steps):
        scheduler.total_steps = max(1, int(steps))
    if scheduler.interval == "epoch":
        scheduler.steps_done = lambda: trainer.global_step
    if timer is not None:
        def spent() -> float:  # elapsed / (elapsed + remaining) = elapsed / max_time
            elapsed = timer.time_elapsed()
            return trainer.strategy.broadcast(elapsed / max(elapsed + timer.time_remaining(), 1e-9))

        scheduler.time_fraction = spent
    elif scheduler.total_steps is None:
        raise ConfigError("lr_scheduler WarmupCosineLR needs an end: set trainer.max_epochs, max_steps or max_time, "
                         "or lr_scheduler.init_args.total_steps")
