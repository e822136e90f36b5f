"""Piano rolls: the published frame-level metrics, the two reference baselines, and the MIDI
(music21) and PNG (matplotlib, Agg) writers.

A piano roll is a (T, 88) 0/1 array, one row per time step (``seqmodels.formats``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from seqmodels.formats import LOWEST_NOTE, N_PITCHES, RRU_WINDOW, rru_windows  # noqa: F401 (rru_windows: re-exported)


# ---- metrics -------------------------------------------------------------------------------
class FrameNLL(Metric):
    """The published frame-level NLL: Σ over sequences and predicted frames of the BCE summed
    over the 88 pitches, divided by the number of predicted frames Σ (T_i − 1).

    Two sum states (float64), so the value does not depend on batch size or padding.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("frames", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor, mask: Tensor) -> None:
        """logits, target (B, T, P); mask (B, T) True on predicted (non-padded) frames."""
        bce = F.binary_cross_entropy_with_logits(logits.double(), target.double(), reduction="none")
        self.total += (bce.sum(-1) * mask).sum()
        self.frames += mask.sum()

    def compute(self) -> Tensor:
        return (self.total / self.frames.clamp(min=1)).float()


class FrameAccuracy(Metric):
    """Frame-level accuracy of Bay et al. (2009): TP / (TP + FP + FN), counts summed over all
    predicted frames and pitches, a pitch predicted on when its probability is > 0.5."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor, mask: Tensor) -> None:
        pred = (logits > 0) & mask.unsqueeze(-1)
        true = (target > 0.5) & mask.unsqueeze(-1)
        self.tp += (pred & true).sum()
        self.fp += (pred & ~true).sum()
        self.fn += (~pred & true).sum()

    def compute(self) -> Tensor:
        return (self.tp / (self.tp + self.fp + self.fn).clamp(min=1)).float()


# ---- the RRU paper's protocol (for benchmarks/chorales.py) -----------------------------------
RRU_BATCH = 16


@torch.no_grad()
def windowed_nll(model, rolls: Sequence[np.ndarray], window: int = RRU_WINDOW,
                 batch_size: int = RRU_BATCH) -> float:
    """Test NLL as LUMII-Syslab/RRU's ``mm_main.py`` computes it (docs/results.md, "What the RRU
    numbers measure"), for comparison with its published numbers:

    - each sequence cut into windows of ``window`` frames (``rru_windows``), each window run from
      the zero state;
    - each window's NLL the mean over its predicted frames of the BCE summed over the pitches;
    - the windows, in order, in batches of ``batch_size`` (the last batch takes the leftovers),
      each batch the mean of its windows, the result the mean over batches.

    ``model(x)`` takes frames (B, T, P) and returns (logits (B, T, P) for the next frames, state).
    """
    pieces = [np.asarray(r, dtype=np.float32) for r in rolls]
    spans = [(k, a, b) for k, r in enumerate(pieces) for a, b in rru_windows(len(r), window)]
    if not spans:
        raise ValueError("windowed_nll: no sequence has two frames, nothing to predict")
    n_batches = max(1, len(spans) // batch_size)
    bounds = [i * batch_size for i in range(n_batches)] + [len(spans)]
    device = next(model.parameters()).device
    batch_means = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        group = spans[lo:hi]
        longest = max(b - a for _, a, b in group)
        x = torch.zeros(len(group), longest + 1, pieces[0].shape[1])
        for row, (k, a, b) in enumerate(group):
            x[row, : b - a + 1] = torch.from_numpy(pieces[k][a : b + 1])
        x = x.to(device)
        logits, _ = model(x[:, :-1])
        bce = F.binary_cross_entropy_with_logits(logits.double(), x[:, 1:].double(), reduction="none").sum(-1)
        n = torch.tensor([b - a for _, a, b in group], device=device)
        mask = torch.arange(longest, device=device) < n.unsqueeze(1)
        batch_means.append(((bce * mask).sum(1) / n).mean().item())
    return sum(batch_means) / len(batch_means)


# ---- baselines (numpy, for benchmarks/chorales.py) -------------------------------------------
def frame_nll(probs_per_sequence: Sequence[np.ndarray], rolls: Sequence[np.ndarray]) -> float:
    """Frame-level NLL of probabilities (T_i − 1, 88) for frames 2..T_i of each roll."""
    total, frames = 0.0, 0
    for p, roll in zip(probs_per_sequence, rolls):
        y = roll[1:].astype(np.float64)
        total += -(y * np.log(p) + (1 - y) * np.log1p(-p)).sum()
        frames += len(y)
    return total / frames


def frequency_baseline(train: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> float:
    """Each pitch on with its frequency over all training frames, Laplace-smoothed
    ((count + 1) / (frames + 2)), independently of everything else."""
    frames = np.concatenate(train).astype(np.float64)
    p = (frames.sum(0) + 1) / (len(frames) + 2)
    return frame_nll([np.broadcast_to(p, (len(r) - 1, len(p))) for r in test], test)


def previous_frame_baseline(train: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> float:
    """Each pitch a two-state Markov chain: P(on at t+1 | on or off at t), estimated per pitch
    on the training transitions, Laplace-smoothed."""
    x = np.concatenate([r[:-1] for r in train]).astype(np.float64)
    y = np.concatenate([r[1:] for r in train]).astype(np.float64)
    p_on = ((x * y).sum(0) + 1) / (x.sum(0) + 2)
    p_off = (((1 - x) * y).sum(0) + 1) / ((1 - x).sum(0) + 2)
    return frame_nll([np.where(r[:-1] > 0, p_on, p_off) for r in test], test)


# ---- writers ----------------------------------------------------------------------------------
def roll_to_notes(roll: np.ndarray) -> list[tuple[int, int, int]]:
    """(midi, first step, number of steps) for every run of consecutive on-steps of a pitch:
    a piano roll cannot tell a held note from a repeated one, so runs become held notes."""
    roll = np.asarray(roll) > 0
    notes = []
    for i in np.flatnonzero(roll.any(0)):
        col = np.concatenate([[False], roll[:, i], [False]]).astype(np.int8)
        starts = np.flatnonzero(np.diff(col) == 1)
        ends = np.flatnonzero(np.diff(col) == -1)
        notes += [(LOWEST_NOTE + int(i), int(s), int(e - s)) for s, e in zip(starts, ends)]
    return sorted(notes, key=lambda n: (n[1], n[0]))


def roll_to_stream(roll: np.ndarray, steps_per_quarter: float = 1.0, bpm: float = 80.0):
    """A music21 Stream with one note per run of a pitch (see ``roll_to_notes``)."""
    from music21 import note, stream, tempo

    step = 1.0 / steps_per_quarter
    s = stream.Stream()
    s.insert(0, tempo.MetronomeMark(number=bpm))
    for midi, first, length in roll_to_notes(roll):
        n = note.Note(midi)
        n.quarterLength = length * step
        s.insert(first * step, n)
    return s


def write_midi(roll: np.ndarray, path: str | Path, steps_per_quarter: float = 1.0,
               bpm: float = 80.0) -> Path:
    """Write a piano roll as a MIDI file with music21."""
    from music21 import midi

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = roll_to_stream(roll, steps_per_quarter, bpm)
    mf = midi.translate.streamToMidiFile(stream)
    mf.open(str(path), "wb")
    try:
        mf.write()
    finally:
        mf.close()
    return path


def plot_roll(roll: np.ndarray, path: str | Path, title: str = "", prime_frames: int = 0) -> Path:
    """Save a piano roll as a PNG (time to the right, pitch up; primed frames marked)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    roll = np.asarray(roll)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    on = np.flatnonzero(roll.any(0)) if roll.size else np.array([], dtype=int)
    lo, hi = (max(0, on.min() - 3), min(N_PITCHES - 1, on.max() + 3)) if on.size else (27, 60)
    fig = Figure(figsize=(min(16, 3 + len(roll) / 12), 4), dpi=100)
    FigureCanvasAgg(fig)  # the Agg renderer, whatever pyplot's backend is
    ax = fig.add_subplot()
    ax.imshow(roll[:, lo:hi + 1].T, origin="lower", aspect="auto", cmap="Greys", interpolation="nearest",
              extent=(-0.5, len(roll) - 0.5, LOWEST_NOTE + lo - 0.5, LOWEST_NOTE + hi + 0.5), vmin=0, vmax=1)
    if prime_frames:
        ax.axvline(prime_frames - 0.5, color="tab:red", linewidth=1, label="end of prime")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("time step")
    ax.set_ylabel("MIDI note")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path))
    return path


def plot_roll_pair(real: np.ndarray, generated: np.ndarray, path: str | Path, prime_frames: int,
                   title: str = "") -> Path:
    """The real continuation of a sequence and a generated one, side by side on the same pitch
    axis, the shared prime marked in both (a PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    real, generated = np.asarray(real), np.asarray(generated)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    on = np.flatnonzero(real.any(0) | generated.any(0)) if real.size else np.array([], dtype=int)
    lo, hi = (max(0, on.min() - 3), min(N_PITCHES - 1, on.max() + 3)) if on.size else (27, 60)
    width = min(18, 4 + (len(real) + len(generated)) / 10)
    fig = Figure(figsize=(width, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, roll, name in zip(axes, (real, generated), ("the real continuation", "the model's continuation")):
        ax.imshow(roll[:, lo:hi + 1].T, origin="lower", aspect="auto", cmap="Greys", interpolation="nearest",
                  extent=(-0.5, len(roll) - 0.5, LOWEST_NOTE + lo - 0.5, LOWEST_NOTE + hi + 0.5), vmin=0, vmax=1)
        ax.axvline(prime_frames - 0.5, color="tab:red", linewidth=1, label=f"end of the {prime_frames} given frames")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("time step")
    axes[0].set_ylabel("MIDI note")
    axes[1].legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path))
    return path
