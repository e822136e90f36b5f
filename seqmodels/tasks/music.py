"""Polyphonic music modeling: predict the next frame of a binary piano roll."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor, nn

from seqmodels.errors import ConfigError
from seqmodels.music import FrameAccuracy, FrameNLL, plot_roll, write_midi
from seqmodels.recurrent import State
from seqmodels.tasks.base import SequenceModel

MAX_OPENINGS = 128


class PolyphonicMusicModel(SequenceModel):
    """Frame x_t (88 binary values) -> cell stack -> 88 logits for frame x_{t+1}.

    Each pitch of the next frame is an independent Bernoulli given the past:
    p(x_{t+1} | x_{≤t}) = Π_i σ(W h_t + b)_i^{x_i} (1 − σ(·)_i)^{1 − x_i}.

    Loss: binary cross-entropy summed over the pitches, averaged over the predicted frames
    of the batch (frames 2..T_i of each sequence; padding masked). Metrics ``{val,test}/nll``
    are the published frame-level NLL (Σ BCE / Σ (T_i − 1) over the whole split, whatever the
    batching) and ``{val,test}/acc`` the frame-level accuracy TP / (TP + FP + FN).

    Args (beyond ``SequenceModel``'s):
        input_dropout: dropout on the input frames.
        output_dropout: dropout on the top layer's output, before the read-out.
        pack: pass the batch's lengths to the stack (``lengths=``; packed sequences with
            ``impl: native``). Off by default: the recurrence runs forward in time, so the
            padding after a sequence's end cannot reach its real frames and the padded frames
            are masked out of the loss and metrics; the outputs and every metric are the same
            either way (tested), and torch's packed LSTM on CPU does not use oneDNN's fused
            kernel (3-6x slower per batch).
    """

    def __init__(self, cell: str = "lstm", input_size: int = 88, hidden_size: int = 256,
                 num_layers: int = 1, dropout: float = 0.0, impl: str = "auto",
                 nonlinearity: str = "tanh", forget_bias: float = 1.0, peephole: bool = False,
                 input_dropout: float = 0.0, output_dropout: float = 0.0, pack: bool = False,
                 recurrent_init: str = "default", recurrent_gain: float = 1.0) -> None:
        super().__init__(cell, input_size, hidden_size, num_layers, dropout, impl,
                         nonlinearity, forget_bias, peephole, recurrent_init, recurrent_gain)
        for name, value in (("input_dropout", input_dropout), ("output_dropout", output_dropout)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {value!r}")
        self.save_hyperparameters(logger=False)
        self.input_dropout, self.output_dropout, self.pack = input_dropout, output_dropout, pack
        self.head = nn.Linear(hidden_size, input_size)
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

    @torch.no_grad()
    def _remember_openings(self, first_frames: Tensor) -> None:
        n = int(self.n_openings)
        if n >= MAX_OPENINGS:
            return
        take = first_frames[: MAX_OPENINGS - n].detach()
        self.openings[n:n + len(take)] = take
        self.n_openings += len(take)

    # ---- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, length: int, prime: Tensor | np.ndarray | None = None, temperature: float = 1.0,
                 top_k: int = 0, seed: int = 0) -> np.ndarray:
        """A piano roll (k + length, 88) uint8: the k prime frames, then ``length`` frames,
        each pitch an independent Bernoulli of sigmoid(logits / temperature) (with top_k > 0,
        only the k most likely pitches of a frame can sound).

        Without a prime, the first frame is one of the training openings the model saw
        (chosen by the seed; silence if it has seen none) and counts among the ``length``.
        Uses its own generator: the global random state is untouched.
        """
        gen = torch.Generator().manual_seed(int(seed))
        was_training = self.training
        self.eval()
        device = self.head.weight.device
        if prime is None or len(prime) == 0:
            n = int(self.n_openings)
            pick = int(torch.randint(n, (1,), generator=gen)) if n else None
            first = self.openings[pick] if pick is not None else torch.zeros(self.hparams.input_size)
            prime = first.reshape(1, -1)
            length = length - 1
        frames = [torch.as_tensor(np.asarray(prime) if not isinstance(prime, Tensor) else prime,
                                  dtype=torch.float32).to(device)]
        logits, state = self(frames[0].unsqueeze(0))
        logits = logits[:, -1]
        for _ in range(max(0, length)):
            probs = torch.sigmoid(logits.float().cpu() / temperature)[0]
            if top_k and top_k < probs.numel():
                keep = torch.zeros_like(probs, dtype=torch.bool)
                keep[probs.topk(top_k).indices] = True
                probs = probs * keep
            frame = torch.bernoulli(probs, generator=gen).to(device)
            frames.append(frame.unsqueeze(0))
            logits, state = self(frame.reshape(1, 1, -1), state)
            logits = logits[:, -1]
        self.train(was_training)
        return (torch.cat(frames).cpu().numpy() > 0.5).astype(np.uint8)

    def sample(self, datamodule: LightningDataModule | None, *, prime: str | None,
               prime_frames: int, length: int, temperature: float, top_k: int, seed: int,
               output: str) -> str:
        """``python cli.py sample``: a chorale from scratch, or continuing the first
        ``prime_frames`` frames of a test sequence (chosen by the seed); writes a MIDI file and a
        piano-roll PNG into ``output`` and returns what to print."""
        if prime:
            raise ConfigError("prime is text; for music use --prime_frames k (the first k frames "
                              "of a test chorale)")
        if prime_frames < 0:
            raise ConfigError(f"prime_frames must be >= 0, got {prime_frames}")
        if top_k > self.hparams.input_size:
            raise ConfigError(f"top_k must be <= {self.hparams.input_size} (pitches), got {top_k}")
        steps_per_quarter = float(getattr(datamodule, "steps_per_quarter", 1.0) or 1.0)
        prime_roll, origin = None, "from scratch (an opening chord seen in training)"
        if prime_frames:
            if datamodule is None or not hasattr(datamodule, "load"):
                raise ConfigError("prime_frames needs the music data (--data / the config's data section)")
            tests = datamodule.load()["test"]
            fits = [i for i, r in enumerate(tests) if len(r) >= prime_frames]
            if not fits:
                raise ConfigError(f"prime_frames {prime_frames} is longer than every test sequence "
                                  f"(longest {max(len(r) for r in tests)} frames)")
            index = fits[int(np.random.default_rng(seed).integers(len(fits)))]
            prime_roll = tests[index][:prime_frames]
            names = getattr(datamodule, "names", None)
            label = names["test"][index] if names else f"#{index}"
            origin = f"primed with the first {prime_frames} frames of test sequence {label}"
        roll = self.generate(length, prime_roll, temperature=temperature, top_k=top_k, seed=seed)
        out = Path(output)
        stem = f"sample-seed{seed}" + (f"-prime{prime_frames}" if prime_frames else "")
        midi = write_midi(roll, out / f"{stem}.mid", steps_per_quarter)
        png = plot_roll(roll, out / f"{stem}.png", title=f"{stem}, temperature {temperature:g}",
                        prime_frames=prime_frames)
        notes = int(roll.sum())
        return (f"{len(roll)} frames ({prime_frames} primed + {len(roll) - prime_frames} generated), "
                f"{notes} note-steps, {origin}, seed {seed}, temperature {temperature:g}\n"
                f"MIDI: {os.path.relpath(midi)}\nPNG:  {os.path.relpath(png)}")
