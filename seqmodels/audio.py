"""Piano rolls to sound: additive synthesis in numpy, written as WAV with the standard library.

A piano roll is a (T, 88) 0/1 array, column i = MIDI note 21 + i (``seqmodels.formats``). Time
follows ``seqmodels.music.write_midi``: ``steps_per_quarter`` frames per quarter note at ``bpm``
quarter notes per minute, so one frame lasts dt = 60 / (bpm · steps_per_quarter) seconds (0.75 s
at the defaults, 1 step per quarter at 80 bpm). As in the MIDI files, a run of consecutive
on-frames of a pitch is one held note (``seqmodels.music.roll_to_notes``), never re-struck per frame.
Each note is a few harmonics of its pitch (``tone``, read from a wavetable) under an attack /
release ``envelope``; ``synthesize`` sums them, ``write_wav`` writes 16-bit PCM with ``wave``.
"""
from __future__ import annotations

import math
import wave
from functools import lru_cache
from pathlib import Path

import numpy as np

from seqmodels.formats import N_PITCHES
from seqmodels.music import roll_to_notes

SAMPLE_RATE = 22050  # Hz
HARMONICS = (1.0, 0.5, 0.25, 0.125)  # amplitude a_k of partial k = 1, 2, ...: a soft organ-like tone
ATTACK, RELEASE = 0.01, 0.1  # seconds
PEAK = 0.9  # the loudest sample after normalization: headroom below full scale
TABLE_SIZE = 1 << 14  # points per period of the wavetable (``tone``)


def frequency(midi: int | np.ndarray) -> float | np.ndarray:
    """Equal temperament, A4 = MIDI 69 = 440 Hz: f = 440 · 2^((m − 69) / 12)."""
    return 440.0 * 2.0 ** ((np.asarray(midi, dtype=np.float64) - 69) / 12)


def frame_seconds(steps_per_quarter: float = 1.0, bpm: float = 80.0) -> float:
    """dt = 60 / (bpm · steps_per_quarter): a quarter note lasts 60 / bpm seconds."""
    for name, value in (("steps_per_quarter", steps_per_quarter), ("bpm", bpm)):
        if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}: "
                             f"pass e.g. steps_per_quarter=1.0, bpm=80.0 (the MIDI writer's defaults)")
    return 60.0 / (float(bpm) * float(steps_per_quarter))


def check_roll(roll) -> np.ndarray:
    """The roll as a (T, 88) bool array, or a one-line ValueError saying what is wrong."""
    roll = np.asarray(roll)
    if roll.ndim != 2 or roll.shape[1] != N_PITCHES:
        raise ValueError(f"roll must be a (T, {N_PITCHES}) piano roll (one row per frame, column i = MIDI "
                         f"note 21 + i), got shape {roll.shape}: stack the frames of one piece as rows")
    if roll.dtype != bool and not np.isin(roll, (0, 1)).all():
        bad = roll[~np.isin(roll, (0, 1))].flat[0]
        raise ValueError(f"roll must hold only 0 and 1, found {bad!r}: threshold probabilities "
                         f"first, e.g. (probs > 0.5)")
    return roll.astype(bool)


@lru_cache(maxsize=None)
def _cycle(partials: int) -> np.ndarray:
    """One period of Σ_{k ≤ partials} a_k sin(2π k x), x = i / TABLE_SIZE (read-only)."""
    x = np.arange(TABLE_SIZE) * (2 * np.pi / TABLE_SIZE)
    table = sum((a * np.sin(k * x) for k, a in enumerate(HARMONICS[:partials], 1)), np.zeros(TABLE_SIZE))
    table.flags.writeable = False
    return table


def tone(f: float, samples: int, sample_rate: int) -> np.ndarray:
    """``samples`` samples of Σ_k a_k sin(2π k f t), t = i / sample_rate, a_k = ``HARMONICS``,
    over the partials k f below the Nyquist frequency sample_rate / 2 (higher ones would alias
    to wrong pitches). Wavetable synthesis: one period tabulated at ``TABLE_SIZE`` points, sample
    i read at phase f t (mod 1), the nearest point; one lookup per sample whatever the number of
    partials, and within 0.1% of full scale of the sines computed directly."""
    partials = sum(k * f < sample_rate / 2 for k in range(1, len(HARMONICS) + 1))
    index = np.round(np.arange(samples) * (f * TABLE_SIZE / sample_rate)).astype(np.int64) % TABLE_SIZE
    return _cycle(partials)[index]


def envelope(u: np.ndarray, held: float, attack: float, release: float) -> np.ndarray:
    """e(u) = min(1, u / attack) · clip((held + release − u) / release, 0, 1): a linear rise over
    ``attack`` seconds, constant while the note is held, a linear fall to 0 over ``release``
    seconds after it ends (no click at either end)."""
    rise = np.minimum(1.0, u / attack) if attack > 0 else np.ones_like(u)
    return rise * (np.clip((held + release - u) / release, 0.0, 1.0) if release > 0 else u < held)


def synthesize(roll, steps_per_quarter: float = 1.0, bpm: float = 80.0, sample_rate: int = SAMPLE_RATE, *,
               attack: float = ATTACK, release: float = RELEASE, peak: float = PEAK) -> np.ndarray:
    """The roll as mono audio, float32 in [−peak, peak]: T · dt + release seconds.

    Each note (pitch m, held for d seconds from t0) adds e(t − t0) · tone(f_m, t − t0): the
    ``tone`` of its frequency, starting at phase 0, under its ``envelope``. The sum over notes
    is scaled so its largest |sample| is ``peak`` (< 1: no clipping, however many notes
    sound); silence stays silence. Tones are computed once per pitch and envelopes once per
    note length, so a dense roll (an untrained model's) costs little more than a sparse one.
    """
    roll = check_roll(roll)
    dt = frame_seconds(steps_per_quarter, bpm)
    if not (isinstance(sample_rate, (int, np.integer)) and sample_rate > 0):
        raise ValueError(f"sample_rate must be a positive integer in Hz, got {sample_rate!r}: e.g. 22050")
    if not (attack >= 0 and release >= 0 and 0 < peak <= 1):
        raise ValueError(f"need attack >= 0 s, release >= 0 s and 0 < peak <= 1, got {attack!r}, {release!r}, "
                         f"{peak!r}: e.g. attack={ATTACK}, release={RELEASE}, peak={PEAK}")
    out = np.zeros(round(len(roll) * dt * sample_rate) + round(release * sample_rate))
    notes = roll_to_notes(roll)
    longest: dict[int, int] = {}  # pitch -> its longest note, in frames
    for midi, _, length in notes:
        longest[midi] = max(length, longest.get(midi, 0))
    span = {n: round((n * dt + release) * sample_rate)  # samples from a note's onset to its silence
            for n in {length for _, _, length in notes}}
    tones = {midi: tone(frequency(midi), span[n], sample_rate) for midi, n in longest.items()}
    envelopes = {n: envelope(np.arange(samples) / sample_rate, n * dt, attack, release)
                 for n, samples in span.items()}
    for midi, first, length in notes:
        start = round(first * dt * sample_rate)
        n = min(span[length], len(out) - start)
        out[start:start + n] += envelopes[length][:n] * tones[midi][:n]
    loudest = np.abs(out).max(initial=0.0)
    if loudest > 0:
        out *= peak / loudest
    return out.astype(np.float32)


def write_wav(roll, path: str | Path, steps_per_quarter: float = 1.0, bpm: float = 80.0,
              sample_rate: int = SAMPLE_RATE, **synthesis) -> Path:
    """Write the roll (``synthesize``; ``synthesis``: its keywords) as a WAV file: mono,
    16-bit PCM (sample = round(32767 · s), little-endian), ``sample_rate`` Hz."""
    audio = synthesize(roll, steps_per_quarter, bpm, sample_rate, **synthesis)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())
    return path
