"""A crash point for the resume tests: after a given step the run stops making progress
(as a machine that hangs), says so in a marker file, and waits to be killed from outside."""
from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch import Callback


class StallAfterStep(Callback):
    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            Path(self.marker).write_text(str(trainer.global_step))
            while True:
                time.sleep(1)
