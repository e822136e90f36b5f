"""Generation from trained models, outside the LightningModules: text from the character LM,
piano rolls from the music model, and ``sample`` (``python cli.py sample``), which also writes
the music's MIDI and PNG files. Every function draws from its own seeded generator: the
global random state is untouched, and the same seed gives the same sample.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor

from seqmodels.errors import ConfigError
from seqmodels.music import plot_roll, write_midi
from seqmodels.tasks import CharLanguageModel, PolyphonicMusicModel


class _Eval:
    """Eval mode and no_grad for the duration, the module's mode restored afterwards."""

    def __init__(self, model: LightningModule) -> None:
        self.model, self.no_grad = model, torch.no_grad()

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def generate_text(model: CharLanguageModel, prime: str = "\n", length: int = 500, temperature: float = 1.0,
                  top_k: int = 0, seed: int = 1) -> str:
    """``prime`` and ``length`` characters after it: c ~ softmax(logits / temperature),
    restricted to the ``top_k`` most likely (0: all); ``<unk>`` (id 0) is never sampled."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    prime = prime or "\n"
    with _Eval(model):
        logits, state = model(torch.tensor([[model.char_to_id.get(c, 0) for c in prime]], device=model.device))
        out = []
        for _ in range(length):
            step = logits[0, -1].float().cpu() / temperature
            step[0] = -math.inf
            if 0 < top_k < step.numel():
                step[step < torch.topk(step, top_k).values[-1]] = -math.inf
            next_id = int(torch.multinomial(torch.softmax(step, -1), 1, generator=generator))
            out.append(next_id)
            logits, state = model(torch.tensor([[next_id]], device=model.device), state)
    return prime + "".join(model.vocab[i] for i in out)


def generate_roll(model: PolyphonicMusicModel, length: int, prime: Tensor | np.ndarray | None = None,
                  temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> np.ndarray:
    """A piano roll (k + length, 88) uint8: the k prime frames, then ``length`` frames,
    each pitch an independent Bernoulli of sigmoid(logits / temperature) (with top_k > 0,
    only the k most likely pitches of a frame can sound).

    Without a prime, the first frame is one of the training openings the model saw
    (chosen by the seed; silence if it has seen none) and counts among the ``length``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    device = model.head.weight.device
    with _Eval(model):
        if prime is None or len(prime) == 0:
            n = int(model.n_openings)
            pick = int(torch.randint(n, (1,), generator=gen)) if n else None
            first = model.openings[pick] if pick is not None else torch.zeros(model.hparams.input_size)
            prime = first.reshape(1, -1)
            length = length - 1
        frames = [torch.as_tensor(np.asarray(prime) if not isinstance(prime, Tensor) else prime,
                                  dtype=torch.float32).to(device)]
        logits, state = model(frames[0].unsqueeze(0))
        logits = logits[:, -1]
        for _ in range(max(0, length)):
            probs = torch.sigmoid(logits.float().cpu() / temperature)[0]
            if top_k and top_k < probs.numel():
                keep = torch.zeros_like(probs, dtype=torch.bool)
                keep[probs.topk(top_k).indices] = True
                probs = probs * keep
            frame = torch.bernoulli(probs, generator=gen).to(device)
            frames.append(frame.unsqueeze(0))
            logits, state = model(frame.reshape(1, 1, -1), state)
            logits = logits[:, -1]
    return (torch.cat(frames).cpu().numpy() > 0.5).astype(np.uint8)


def sample_music(model: PolyphonicMusicModel, datamodule: LightningDataModule | None, *, prime_frames: int,
                 length: int, temperature: float, top_k: int, seed: int, output: str) -> str:
    """A chorale from scratch, or continuing the first ``prime_frames`` frames of a test
    sequence (chosen by the seed); writes a MIDI file and a piano-roll PNG into ``output``
    and returns what to print."""
    if prime_frames < 0:
        raise ConfigError(f"prime_frames must be >= 0, got {prime_frames}")
    if top_k > model.hparams.input_size:
        raise ConfigError(f"top_k must be <= {model.hparams.input_size} (pitches), got {top_k}")
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
    roll = generate_roll(model, length, prime_roll, temperature=temperature, top_k=top_k, seed=seed)
    out = Path(output)
    stem = f"sample-seed{seed}" + (f"-prime{prime_frames}" if prime_frames else "")
    midi = write_midi(roll, out / f"{stem}.mid", steps_per_quarter)
    png = plot_roll(roll, out / f"{stem}.png", title=f"{stem}, temperature {temperature:g}", prime_frames=prime_frames)
    return (f"{len(roll)} frames ({prime_frames} primed + {len(roll) - prime_frames} generated), "
            f"{int(roll.sum())} note-steps, {origin}, seed {seed}, temperature {temperature:g}\n"
            f"MIDI: {os.path.relpath(midi)}\nPNG:  {os.path.relpath(png)}")


def sample(model: LightningModule, datamodule: LightningDataModule | None, *, prime: str | None,
           prime_frames: int, length: int, temperature: float, top_k: int, seed: int, output: str) -> str:
    """What ``python cli.py sample`` prints, for the text and the music model."""
    if isinstance(model, CharLanguageModel):
        return generate_text(model, prime if prime is not None else "\n", length, temperature, top_k, seed)
    if isinstance(model, PolyphonicMusicModel):
        if prime:
            raise ConfigError("prime is text; for music use --prime_frames k (the first k frames of a test chorale)")
        return sample_music(model, datamodule, prime_frames=prime_frames, length=length, temperature=temperature,
                            top_k=top_k, seed=seed, output=output)
    raise ConfigError(f"{type(model).__name__} does not generate; `sample` works with the text and music models")
