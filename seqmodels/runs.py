"""Where a run's files go, and how its figures and sounds reach the loggers. Imports nothing
from the CLI, the tasks or the callbacks, so every one of them can use it."""
from __future__ import annotations

import importlib.util
import os
import re
import warnings

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger


def run_dir(trainer: Trainer) -> str:
    """The run's own directory, ``save_dir/name/version`` (where checkpoints go too)."""
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


def log_image(trainer: Trainer, key: str, path: str, caption: str | None = None) -> None:
    """An image file to every W&B logger of the run, at the current step."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step,
                             **({"caption": [caption]} if caption else {}))


def log_audio(trainer: Trainer, key: str, path: str, sample_rate: int, caption: str | None = None) -> bool:
    """An audio file (WAV) to every W&B logger of the run, at the current step, as ``wandb.Audio``.
    wandb logs audio only with the ``soundfile`` package installed, even from a file: without it,
    nothing is logged, one warning says so, and the result is False (True: logged, or no W&B)."""
    loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
    if loggers and importlib.util.find_spec("soundfile") is None:
        warnings.warn("W&B logs audio only with the soundfile package: `pip install soundfile` to hear the "
                      "WAV files in the W&B run (they are in the run's folder)", stacklevel=2)
        return False
    for logger in loggers:
        logger.log_audio(key=key, audios=[str(path)], step=trainer.global_step, sample_rate=[sample_rate],
                         **({"caption": [caption]} if caption else {}))
    return True


def save_figure(fig, trainer: Trainer, name: str) -> str:
    """Write ``fig`` as ``<run dir>/plots/<name>.png``, log it to W&B if present, close it."""
    import matplotlib.pyplot as plt

    folder = os.path.join(run_dir(trainer), "plots")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.png")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    log_image(trainer, "diagnostics/" + re.sub(r"_epoch\d+$", "", name), path)  # one panel per kind of plot
    return path
