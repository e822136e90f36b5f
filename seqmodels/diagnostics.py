"""Training diagnostics: look inside BPTT while a model trains. Each is a Lightning callback
enabled from the config; each writes PNGs into the run's directory and logs them (and its
numbers) to whatever logger the run has — W&B online, offline or disabled, CSV, TensorBoard.

    GradientDistribution   histograms of every parameter's gradient, per iteration and per epoch
    TemporalGradients      ‖∂L/∂h_t‖ against t on a fixed probe batch: vanishing / exploding gradients
    ClippingStats          train/grad_norm before clipping, train/clip_fraction per epoch
    LengthGeneralization   test MSE against sequence length (sums task)
"""
from __future__ import annotations

import math
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402
from torch import Tensor  # noqa: E402

from seqmodels.runs import save_figure  # noqa: E402


# ---- gradient distributions ---------------------------------------------------------------
class GradientDistribution(Callback):
    """Every ``every_n_steps``: a fixed-bin histogram of log10|g| for every parameter.

    To W&B: W&B's own histogram of each gradient through ``WandbLogger.watch`` (the
    ``gradients/`` panels, every ``every_n_steps``; ``log_histograms: false`` turns them off).
    On disk, and as images to every logger: per-epoch sums of the fixed-bin histograms, and
    the histograms of the iterations within the current epoch (at most ``max_iterations``
    kept, by doubling the stride), so memory stays bounded whatever the run's length. At the end of every ``plot_every_n_epochs``-th epoch (and the
    last) two ridge plots: every parameter's distribution across epochs, and across the
    iterations of that epoch.
    """

    def __init__(self, every_n_steps: int = 50, bins: int = 60, log10_range: tuple[float, float] = (-12.0, 2.0),
                 max_iterations: int = 64, log_histograms: bool = True, plot_every_n_epochs: int = 1) -> None:
        if every_n_steps < 1 or bins < 2 or max_iterations < 2:
            raise ValueError("every_n_steps >= 1, bins >= 2 and max_iterations >= 2 are required")
        self.every_n_steps, self.bins, self.max_iterations = every_n_steps, bins, max_iterations
        self.edges = np.linspace(*log10_range, bins + 1)
        self.log_histograms, self.plot_every_n_epochs = log_histograms, plot_every_n_epochs
        self.epoch_histograms: dict[str, list[np.ndarray]] = {}   # name -> one (bins,) per epoch
        self.iteration_histograms: dict[str, list[np.ndarray]] = {}  # name -> (bins,) per kept iteration
        self.iteration_steps: list[int] = []
        self._current: dict[str, np.ndarray] = {}
        self._stride = every_n_steps
        self._plotted = True  # the figures show every summary kept so far

    def histogram(self, grad: Tensor) -> np.ndarray:
        """Counts of log10|g| in the fixed bins (exact zeros and underflow in the first bin)."""
        values = grad.detach().float().abs().flatten().clamp_min(10.0 ** self.edges[0]).log10()
        counts = torch.histc(values.clamp(float(self.edges[0]), float(self.edges[-1])), bins=self.bins,
                             min=float(self.edges[0]), max=float(self.edges[-1]))
        return counts.cpu().numpy()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        grads = {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        keep = step % self._stride == 0
        for name, grad in grads.items():
            hist = self.histogram(grad)
            self._current[name] = self._current.get(name, 0) + hist
            if keep:
                self.iteration_histograms.setdefault(name, []).append(hist)
        if keep:
            self.iteration_steps.append(step)
            if len(self.iteration_steps) > self.max_iterations:  # halve: keep every other one
                self._stride *= 2
                self.iteration_steps = self.iteration_steps[::2]
                for name in self.iteration_histograms:
                    self.iteration_histograms[name] = self.iteration_histograms[name][::2]

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """W&B's own gradient histograms (``WandbLogger.watch``), every ``every_n_steps``."""
        if self.log_histograms:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.watch(pl_module, log="gradients", log_freq=self.every_n_steps, log_graph=False)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """The hooks ``watch`` put on the parameters go with the run (a later test or sample
        of the same model runs without them)."""
        if self.log_histograms and stage == "fit":
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.unwatch(pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.iteration_histograms, self.iteration_steps, self._current = {}, [], {}
        self._stride = self.every_n_steps

    @rank_zero_only
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._keep_epoch_summary():
            return
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % self.plot_every_n_epochs and not last:
            return  # the summaries are kept; only the figures wait
        self.plot(trainer, epoch)

    @rank_zero_only
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A run stopped by max_time or max_steps mid-epoch still gets its summary and figures."""
        self._keep_epoch_summary()
        if not self._plotted:
            self.plot(trainer, trainer.current_epoch)

    def _keep_epoch_summary(self) -> bool:
        if not self._current:
            return False
        for name, hist in self._current.items():
            self.epoch_histograms.setdefault(name, []).append(hist)
        self._current, self._plotted = {}, False
        return True

    def plot(self, trainer: Trainer, epoch: int) -> None:
        self._plotted = True
        self.ridge_plot(self.epoch_histograms, [f"epoch {e}" for e in range(len(next(iter(self.epoch_histograms.values()))))],
                        trainer, "gradients_by_epoch", "gradient distribution per parameter across epochs")
        if self.iteration_histograms:
            self.ridge_plot(self.iteration_histograms, [f"step {s}" for s in self.iteration_steps], trainer,
                            f"gradients_by_iteration_epoch{epoch:03d}", f"gradient distribution within epoch {epoch}")

    def ridge_plot(self, histograms: dict[str, list[np.ndarray]], labels: list[str], trainer: Trainer,
                   name: str, title: str) -> str:
        """One panel per parameter; one ridge (normalised density of log10|g|) per row label."""
        names = list(histograms)
        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.5 + 0.22 * len(labels) * rows + 1.2 * rows),
                                 squeeze=False)
        centers = (self.edges[:-1] + self.edges[1:]) / 2
        colors = plt.cm.viridis(np.linspace(0, 1, max(len(labels), 2)))
        for ax, param in zip(axes.flat, names):
            for i, hist in enumerate(histograms[param]):
                density = hist / max(hist.max(), 1)
                ax.fill_between(centers, i, i + 0.9 * density, color=colors[i], alpha=0.8, lw=0.5, ec="k")
            ax.set_title(param, fontsize=8)
            ax.set_yticks(np.arange(len(labels)) + 0.3)
            ax.set_yticklabels(labels, fontsize=6)
            ax.set_xlabel("log10 |gradient|", fontsize=7)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.suptitle(title)
        fig.subplots_adjust(hspace=0.5)
        return save_figure(fig, trainer, name)


# ---- gradients through time ---------------------------------------------------------------
def temporal_gradient_norms(pl_module: LightningModule, batch) -> np.ndarray:
    """‖∂L/∂h_t‖ (L2 over batch and units) for every layer and step: (num_layers, T).

    L is the task's ``probe_loss`` (the last step's loss for many-to-one tasks, the summed
    loss for many-to-many); the model runs in eval mode. The stack runs cell by cell (``impl:
    autograd``, the same function) and a forward hook on every cell keeps its h_t, a tensor in
    the graph: ``torch.autograd.grad(loss, h_t)`` is ∂L/∂h_t, the total derivative (through
    the output at t and through every later step).
    """
    stack = pl_module.stack
    captured: list[list[Tensor]] = [[] for _ in stack.layers]
    hooks = [layer.cell.register_forward_hook(lambda module, args, state, hs=hs: hs.append(state[0]))
             for layer, hs in zip(stack.layers, captured)]
    was_training, impl = pl_module.training, stack.impl
    pl_module.eval()
    stack.impl = "autograd"
    try:
        with torch.enable_grad():
            loss = pl_module.probe_loss(batch)
            grads = torch.autograd.grad(loss, [h for hs in captured for h in hs], allow_unused=True)
    finally:
        for hook in hooks:
            hook.remove()
        stack.impl = impl
        pl_module.train(was_training)
    norms = [0.0 if g is None else float(g.norm()) for g in grads]
    return np.array(norms).reshape(len(captured), -1)


class TemporalGradients(Callback):
    """At the start of training, at the end of every ``every_n_epochs``-th epoch and at the
    end of training, ‖∂L/∂h_t‖ against t on a fixed probe batch (the first validation batch,
    else the first training batch), one curve each, log scale, per layer.

    The vanishing/exploding gradient picture: how much the loss at the end still depends on
    the state t steps earlier. Saved as ``plots/temporal_gradients.png`` and logged.
    """

    def __init__(self, probe_size: int = 32, every_n_epochs: int = 1) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"TemporalGradients every_n_epochs must be >= 1, got {every_n_epochs}")
        self.probe_size, self.every_n_epochs = probe_size, every_n_epochs
        self.probe = None
        self.history: list[tuple[str, np.ndarray]] = []  # (label, norms (num_layers, T))
        self._step = None  # the global step of the last curve

    def _probe(self, trainer: Trainer, pl_module: LightningModule):
        if self.probe is None:
            loaders = trainer.val_dataloaders or trainer.train_dataloader
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            batch = next(iter(loader))
            self.probe = tuple(b[: self.probe_size] if isinstance(b, Tensor) and b.dim() > 0 else b for b in batch)
        return pl_module.transfer_batch_to_device(self.probe, pl_module.device, 0)

    @rank_zero_only
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if hasattr(pl_module, "probe_loss") and not self.history:
            self.history.append(("init", temporal_gradient_norms(pl_module, self._probe(trainer, pl_module))))
            self._step = trainer.global_step

    @rank_zero_only
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._record(trainer, pl_module, f"epoch {trainer.current_epoch}")

    @rank_zero_only
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._step != trainer.global_step:  # steps since the last curve (e.g. stopped by max_time)
            self._record(trainer, pl_module, f"end (step {trainer.global_step})")

    def _record(self, trainer: Trainer, pl_module: LightningModule, label: str) -> None:
        if not hasattr(pl_module, "probe_loss"):
            return
        norms = temporal_gradient_norms(pl_module, self._probe(trainer, pl_module))
        self.history.append((label, norms))
        self._step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics({f"diagnostics/grad_h_first_over_last_l{l}": float(n[0] / max(n[-1], 1e-30))
                                for l, n in enumerate(norms)}, step=trainer.global_step)
        self.plot(trainer, f"{type(pl_module).__name__} ({pl_module.stack.cell_type})")

    def plot(self, trainer: Trainer, title: str) -> str:
        layers = self.history[-1][1].shape[0]
        fig, axes = plt.subplots(1, layers, figsize=(5 * layers, 3.6), squeeze=False)
        colors = plt.cm.viridis(np.linspace(0, 1, max(len(self.history), 2)))
        for l, ax in enumerate(axes[0]):
            for (label, norms), color in zip(self.history, colors):
                ax.semilogy(np.arange(1, norms.shape[1] + 1), np.maximum(norms[l], 1e-30),
                            color="k" if label == "init" else color, ls="--" if label == "init" else "-",
                            label="at init" if label == "init" else label)
            ax.set_xlabel("time step t")
            ax.set_ylabel("‖∂L/∂h_t‖")
            ax.set_title(f"layer {l}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.suptitle(f"gradient w.r.t. the hidden state over time — {title}")
        return save_figure(fig, trainer, "temporal_gradients")


# ---- clipping ---------------------------------------------------------------------------------
class ClippingStats(Callback):
    """``train/grad_norm``: the total 2-norm of the gradients before clipping, every step
    (Lightning's ``on_before_optimizer_step`` sees them unclipped); ``train/clip_fraction``:
    the share of this epoch's steps whose norm exceeded ``trainer.gradient_clip_val``.

    Both stay on the device until logged: no host synchronization per step on a GPU."""

    def __init__(self) -> None:
        self.steps, self.clipped = 0, None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.steps, self.clipped = 0, None

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        grads = [p.grad.detach() for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        clip = trainer.gradient_clip_val
        algorithm = trainer.gradient_clip_algorithm or "norm"
        self.steps += 1
        if clip and algorithm == "norm":
            over = (~torch.isfinite(norm) | (norm > clip)).long()
            self.clipped = over if self.clipped is None else self.clipped + over

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.steps:
            clipped = 0 if self.clipped is None else int(self.clipped)
            pl_module.log("train/clip_fraction", clipped / self.steps, sync_dist=True)  # equal on all ranks


# ---- length generalization ----------------------------------------------------------------
class LengthGeneralization(Callback):
    """After ``test``: MSE against test length (log-log), the training length marked, saved
    as ``plots/length_generalization.png`` and logged; a table on the console."""

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        found = {}
        for key, value in trainer.callback_metrics.items():
            match = re.fullmatch(r"test/mse_len_(\d+)", key)
            if match:
                found[int(match.group(1))] = float(value)
        if not found:
            return
        lengths = sorted(found)
        train_length = getattr(trainer.datamodule, "seq_len", None)
        print(f"\n{'length':>8} {'test MSE':>12}" + ("" if train_length is None else "   (trained on length "
                                                       f"{train_length})"))
        for T in lengths:
            print(f"{T:>8} {found[T]:>12.6f}{'   <- training length' if T == train_length else ''}")
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.loglog(lengths, [max(found[T], 1e-12) for T in lengths], "o-", label="test MSE")
        if train_length is not None:
            ax.axvline(train_length, color="r", ls="--", label=f"training length {train_length}")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("MSE")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        ax.set_title(f"length generalization — {pl_module.stack.cell_type}")
        save_figure(fig, trainer, "length_generalization")
