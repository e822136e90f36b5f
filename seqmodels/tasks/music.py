"""Polyphonic music modeling: predict the next frame of a binary piano roll."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqmodels.errors import ConfigError
from seqmodels.music import FrameAccuracy, FrameNLL
from seqmodels.recurrent import State
from seqmodels.tasks.base import NetworkConfig, SequenceModel

MAX_OPENINGS = 128


class PolyphonicMusicModel(SequenceModel):
    """Frame x_t (88 binary values) -> cell stack -> 88 logits for frame x_{t+1}.

    Each pitch of the next frame is an independent Bernoulli given the past:
    p(x_{t+1} | x_{≤t}) = Π_i σ(W h_t + b)_i^{x_i} (1 − σ(·)_i)^{1 − x_i}.

    Loss: binary cross-entropy summed over the pitches, averaged over the predicted frames
    of the batch (frames 2..T_i of each sequence; padding masked). Metrics ``{val,test}/nll``
    are the published frame-level NLL (Σ BCE / Σ (T_i − 1) over the whole split, whatever the
    batching) and ``{val,test}/acc`` the frame-level accuracy TP / (TP + FP + FN).

    Args:
        network: the recurrent stack (``NetworkConfig``).
        input_size: pitches per frame (linked from the data by the CLI).
        input_dropout: dropout on the input frames.
        output_dropout: dropout on the top layer's output, before the read-out.
        pack: pass the batch's lengths to the stack (``lengths=``; packed sequences with
            ``impl: torch``). Off by default: the recurrence runs forward in time, so the
            padding after a sequence's end cannot reach its real frames and the padded frames
            are masked out of the loss and metrics; the outputs and every metric are the same
            either way (tested), and torch's packed LSTM on CPU does not use oneDNN's fused
            kernel (several times slower per batch, docs/models.md).
    """

    task_name = "music"  # in W&B run names and tags (seqmodels.tracking)

    def __init__(self, network: NetworkConfig = NetworkConfig(), input_size: int = 88,
                 input_dropout: float = 0.0, output_dropout: float = 0.0, pack: bool = False) -> None:
        """input_size: pitches per frame (linked from the data by the CLI)."""
        super().__init__(network, input_size)
        for name, value in (("input_dropout", input_dropout), ("output_dropout", output_dropout)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {value!r}")
        self.save_hyperparameters(logger=False)
        self.input_dropout, self.output_dropout, self.pack = input_dropout, output_dropout, pack
        self.head = nn.Linear(self.network.hidden_size, input_size)
        # Opening frames of training sequences, seen while training: generation "from scratch"
        # starts from one of them (the model predicts frame t+1 from frames <= t, so it needs a
        # first frame). Saved in the checkpoint.
        self.register_buffer("openings", torch.zeros(MAX_OPENINGS, input_size))
        self.register_buffer("n_openings", torch.zeros((), dtype=torch.long))
        self.val_nll, self.val_acc = FrameNLL(), FrameAccuracy()
        self.test_nll, self.test_acc = FrameNLL(), FrameAccuracy()

    # ---- model ---------------------------------------------------------------------------
    def forward(self, x: Tensor, state: State | None = None,
                lengths: Tensor | None = None) -> tuple[Tensor, State]:
        """x (B, T, 88) frames, lengths (B,) or None -> logits (B, T, 88) for frames 2..T+1, state."""
        if self.input_dropout:
            x = F.dropout(x, self.input_dropout, self.training)
        if lengths is not None and bool((lengths == x.shape[1]).all()):
            lengths = None  # nothing padded: no packing needed
        out, state = self.stack(x, state, lengths=lengths)
        if self.output_dropout:
            out = F.dropout(out, self.output_dropout, self.training)
        return self.head(out), state

    def _step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> loss, logits, targets, mask (B, T-1) of predicted frames."""
        x, lengths = batch
        inputs, targets = x[:, :-1], x[:, 1:]
        n_pred = (lengths.to(x.device) - 1).clamp(min=0)
        logits, _ = self(inputs, lengths=n_pred.clamp(min=1).cpu() if self.pack else None)
        mask = torch.arange(inputs.shape[1], device=x.device) < n_pred.unsqueeze(1)
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1)
        frames = mask.sum()
        loss = (bce * mask).sum() / frames.clamp(min=1)
        return loss, logits, targets, mask

    def probe_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The loss the diagnostics differentiate: BCE summed over pitches and predicted frames,
        mean over sequences."""
        loss, _, _, mask = self._step(batch)
        return loss * mask.sum() / mask.shape[0]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self._remember_openings(batch[0][:, 0])
        loss, _, _, mask = self._step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(mask.sum()))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, logits, targets, mask = self._step(batch)
        self.val_nll.update(logits, targets, mask)
        self.val_acc.update(logits, targets, mask)
        self.log("val/loss", loss, batch_size=int(mask.sum()), sync_dist=True)
        self.log("val/nll", self.val_nll, prog_bar=True)
        self.log("val/acc", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, logits, targets, mask = self._step(batch)
        self.test_nll.update(logits, targets, mask)
        self.test_acc.update(logits, targets, mask)
        self.log("test/loss", loss, batch_size=int(mask.sum()), sync_dist=True)
        self.log("test/nll", self.test_nll)
        self.log("test/acc", self.test_acc)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict:
        """``python cli.py predict``: for every test sequence, p(pitch on) for each predicted
        frame (frames 2..T_i, from the frames before), the frames that came, and the lengths."""
        x, lengths = batch
        probs = torch.sigmoid(self(x[:, :-1])[0].float())
        n = (lengths - 1).clamp(min=0).tolist()
        return {"frame_probs": [p[:k] for p, k in zip(probs, n)], "frames": [f[:k] for f, k in zip(x[:, 1:], n)]}

    @torch.no_grad()
    def _remember_openings(self, first_frames: Tensor) -> None:
        n = int(self.n_openings)
        if n >= MAX_OPENINGS:
            return
        take = first_frames[: MAX_OPENINGS - n].detach()
        self.openings[n:n + len(take)] = take
        self.n_openings += len(take)
