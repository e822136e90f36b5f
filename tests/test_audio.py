"""seqmodels.audio: piano rolls synthesized to WAV (the music model's continuations, heard)."""
from __future__ import annotations

import wave

import numpy as np
import pytest

from seqmodels.audio import HARMONICS, frame_seconds, frequency, synthesize, tone, write_wav

A4 = 69 - 21  # column of MIDI 69, 440 Hz
RATE = 8000  # Hz: enough for the notes below, and fast


def roll_of(*frames: list[int]) -> np.ndarray:
    """One frame per argument, each a list of the columns that sound."""
    roll = np.zeros((len(frames), 88), dtype=np.uint8)
    for t, cols in enumerate(frames):
        roll[t, cols] = 1
    return roll


def attacks(audio: np.ndarray, rate: int, window: float = 0.005, level: float = 0.1) -> int:
    """Onsets: how often the short-time RMS (``window`` seconds) rises through ``level`` · its maximum."""
    n = int(window * rate)
    rms = np.sqrt((audio[: len(audio) // n * n].reshape(-1, n).astype(np.float64) ** 2).mean(1))
    loud = rms > level * rms.max()
    return int(loud[0]) + int((loud[1:] & ~loud[:-1]).sum())


def test_the_wav_file_is_mono_16_bit_at_the_rate_and_lasts_the_frames_plus_the_release(tmp_path):
    roll = roll_of([A4], [A4], [A4 - 12, A4 - 5, A4], [])  # a held A4, then a chord, then silence
    path = write_wav(roll, tmp_path / "sub" / "x.wav", steps_per_quarter=2.0, bpm=120.0, sample_rate=RATE,
                     release=0.1)
    with wave.open(str(path), "rb") as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, RATE)
        assert f.getnframes() == round(4 * 0.25 * RATE) + round(0.1 * RATE)  # dt = 60 / (120 · 2) = 0.25 s
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    assert frame_seconds(2.0, 120.0) == 0.25
    expected = synthesize(roll, 2.0, 120.0, RATE, release=0.1)
    np.testing.assert_allclose(pcm / 32767, expected, atol=1 / 32767)
    assert np.abs(pcm).max() > 0.8 * 32767, "normalized to the peak"


def test_a_held_a4_sounds_at_440_hz():
    audio = synthesize(roll_of([A4], [A4], [A4], [A4]), steps_per_quarter=4.0, bpm=60.0, sample_rate=RATE)
    spectrum = np.abs(np.fft.rfft(audio))
    freqs = np.fft.rfftfreq(len(audio), 1 / RATE)
    assert abs(freqs[spectrum.argmax()] - 440.0) <= freqs[1]


def test_the_wavetable_tone_is_the_sum_of_sines_and_nothing_above_nyquist():
    """``tone`` reads one tabulated period: equal to the partials computed directly, and the
    partials at or above sample_rate / 2 (which would alias down to wrong pitches) left out."""
    t = np.arange(20000) / 22050
    for midi in (21, 69, 100):
        f = frequency(midi)
        direct = sum(a * np.sin(2 * np.pi * k * f * t) for k, a in enumerate(HARMONICS, 1) if k * f < 11025)
        np.testing.assert_allclose(tone(f, len(t), 22050), direct, atol=1e-3 * sum(HARMONICS))
    c8 = np.abs(np.fft.rfft(tone(frequency(108), 22050, 22050)))  # 1 s: bins of 1 Hz; 3 · 4186 Hz > 11025 Hz
    assert c8[round(22050 - 3 * frequency(108))] < 1e-3 * c8.max(), "no alias of the third partial"
    assert c8[round(2 * frequency(108))] > 0.1 * c8.max(), "the second partial is there"


def test_a_note_held_over_three_frames_is_struck_once_and_a_repeated_one_twice():
    kw = dict(steps_per_quarter=4.0, bpm=100.0, sample_rate=RATE)  # dt = 0.15 s
    held = synthesize(roll_of([A4], [A4], [A4]), **kw)
    again = synthesize(roll_of([A4], [], [A4]), **kw)
    assert attacks(held, RATE) == 1
    assert attacks(again, RATE) == 2
    # between its attack and its release the held note's loudness is constant: no dip and no
    # bump (a re-struck note overlapping the last one's release) at the frame boundaries
    n = round(0.025 * RATE)  # 25 ms windows: 11 periods of 440 Hz, so a steady tone has a steady RMS
    rms = np.sqrt((held[: len(held) // n * n].reshape(-1, n).astype(np.float64) ** 2).mean(1))
    inside = rms[1:round(0.45 / 0.025)]  # after the 10 ms attack, up to the note's end at 0.45 s
    assert inside.min() > 0.99 * inside.max()


def test_silence_is_silence_and_a_full_chord_does_not_clip(tmp_path):
    silent = synthesize(np.zeros((3, 88)), sample_rate=RATE)
    assert silent.dtype == np.float32 and len(silent) > 0 and not silent.any()
    chord = roll_of(list(range(88)), list(range(88)))
    audio = synthesize(chord, steps_per_quarter=8.0, sample_rate=RATE)
    assert audio.dtype == np.float32 and np.isfinite(audio).all()
    assert 0.5 < np.abs(audio).max() <= 1.0
    with wave.open(str(write_wav(chord, tmp_path / "chord.wav", steps_per_quarter=8.0, sample_rate=RATE))) as f:
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    assert np.abs(pcm.astype(np.int32)).max() < 32767, "no sample at full scale"


@pytest.mark.parametrize("roll,kwargs,words", [
    (np.zeros((4, 87)), {}, "(T, 88)"),
    (np.zeros(88), {}, "(T, 88)"),
    (np.full((2, 88), 0.5), {}, "only 0 and 1"),
    (np.zeros((2, 88)), {"bpm": 0}, "bpm must be a positive"),
    (np.zeros((2, 88)), {"steps_per_quarter": -1.0}, "steps_per_quarter must be a positive"),
    (np.zeros((2, 88)), {"bpm": float("nan")}, "bpm must be a positive"),
    (np.zeros((2, 88)), {"sample_rate": 0}, "sample_rate must be a positive integer"),
    (np.zeros((2, 88)), {"release": -0.1}, "release >= 0"),
])
def test_bad_input_gets_one_line_that_says_what_to_do(roll, kwargs, words):
    with pytest.raises(ValueError) as err:
        synthesize(roll, **kwargs)
    message = str(err.value)
    assert words in message and "\n" not in message and ":" in message
