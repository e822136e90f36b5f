"""Lightning callbacks that show what a model does while it trains."""
from __future__ import annotations

import os

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from seqmodels.cli import run_dir


class TextSamples(Callback):
    """After every validation, generate a few texts: printed to the console, appended to
    ``samples.txt`` in the run's directory, and logged to W&B as a table (``samples``).

    Args:
        primes: one sample per prime (the text it starts from).
        length: characters to generate after the prime.
        temperature, top_k: as ``python cli.py sample``.
        seed: the same seed at every validation, so samples differ only by training.
    """

    def __init__(self, primes: list[str] = ["\n"], length: int = 200,  # noqa: B006
                 temperature: float = 0.8, top_k: int = 0, seed: int = 1) -> None:
        self.primes, self.length = list(primes), length
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.rows: list[list] = []

    @rank_zero_only
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not hasattr(pl_module, "generate"):
            return
        samples = [pl_module.generate(p, self.length, self.temperature, self.top_k, self.seed)
                   for p in self.primes]
        header = f"--- samples at epoch {trainer.current_epoch}, step {trainer.global_step} ---"
        print("\n".join([header, *samples]), flush=True)
        directory = run_dir(trainer)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "samples.txt"), "a", encoding="utf-8") as f:
            f.write("\n".join([header, *samples]) + "\n")
        self.rows += [[trainer.current_epoch, trainer.global_step, p, s] for p, s in zip(self.primes, samples)]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):  # the whole table so far: W&B keeps the last
                logger.log_text(key="samples", columns=["epoch", "step", "prime", "sample"], data=self.rows)
