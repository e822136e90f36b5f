"""Stop a diverging run before it costs anything: ``DivergenceGuard``."""
from __future__ import annotations

import os

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from seqmodels.errors import TrainingDiverged


def last_good_checkpoint(trainer: Trainer) -> str:
    """The newest checkpoint any checkpoint callback wrote (``last.ckpt`` or the best)."""
    paths = [p for cb in trainer.checkpoint_callbacks for p in (cb.last_model_path, cb.best_model_path)
             if p and os.path.isfile(p)]
    return f"last good checkpoint: {max(paths, key=os.path.getmtime)}" if paths else "no checkpoint was written yet"


class DivergenceGuard(Callback):
    """Raise ``TrainingDiverged`` as soon as the loss or a gradient is not finite.

    The check runs before the backward pass (the loss) and before the optimizer step (the
    gradients), so the weights never take a non-finite update and no checkpoint — ``best``
    or ``last`` — is ever written from a diverged model. The CLI prints the one-line
    message (step, likely cause, last good checkpoint) and exits with code 2.
    """

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            self._stop(trainer, f"the loss is {float(loss.detach().float().reshape(-1)[0])}")

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # float16 with a loss scaler: it skips steps with non-finite gradients and lowers the scale
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        if not named:
            return
        finite = torch.stack([torch.isfinite(g).all() for _, g in named])  # one host sync, not one per tensor
        if not bool(finite.all()):
            self._stop(trainer, f"the gradient of {named[int((~finite).nonzero()[0, 0])][0]} is not finite")

    @staticmethod
    def _stop(trainer: Trainer, what: str) -> None:
        clip = trainer.gradient_clip_val
        hint = ("lower the learning rate (optimizer.init_args.lr)" +
                ("" if clip else " or set trainer.gradient_clip_val (e.g. 1.0)"))
        raise TrainingDiverged(f"training diverged at step {trainer.global_step}: {what}; likely cause: "
                               f"exploding gradients, {hint}; {last_good_checkpoint(trainer)}")
