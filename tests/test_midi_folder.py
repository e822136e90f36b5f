"""ChoralesDataModule on a folder of MIDI files: the rolls written are the rolls read, the
train/valid/test subfolder layout, the 60/20/20 split otherwise, files music21 cannot parse, the
on-disk cache and its invalidation, and one-line errors. MIDI files are written by the project
itself (seqmodels.music.write_midi) or, for raw events, with music21's MIDI classes."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

import data_modules.midi_folder as midi_folder
from data_modules.chorales import ChoralesDataModule
from data_modules.midi_folder import load_midi_folder, midi_to_roll
from data_modules.music_formats import split_counts
from seqmodels.music import write_midi
from tests.test_chorales_data import one_line_error


def random_roll(seed: int, steps: int = 10) -> np.ndarray:
    """A few random notes, the last step never silent (a MIDI file ends with its last note)."""
    rng = np.random.default_rng(seed)
    roll = (rng.random((steps, 88)) < 0.04).astype(np.uint8)
    roll[-1, 30 + seed] = 1
    roll[0, 40 + seed] = 1
    return roll


def write_rolls(folder: Path, names: list[str], steps_per_quarter: float, seed: int = 0) -> dict[str, np.ndarray]:
    rolls = {}
    for i, name in enumerate(names):
        rolls[name] = random_roll(seed + i)
        write_midi(rolls[name], folder / name, steps_per_quarter)
    return rolls


def corrupt(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).bytes(64))
    return path


def load_quietly(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no skip warning expected
        return load_midi_folder(*args, **kwargs)


def test_rolls_read_from_a_folder_equal_the_rolls_written_and_bad_files_are_skipped(tmp_path):
    folder = tmp_path / "songs"
    written = write_rolls(folder, ["a.mid", "b.mid", "deep/er/c.MID", "d.midi", "e.mid"], steps_per_quarter=2)
    corrupt(folder / "broken.mid")
    (folder / "notes.txt").write_text("not MIDI")
    dm = ChoralesDataModule(path=str(folder), steps_per_quarter=2, cache_dir=str(tmp_path / "cache"),
                            progress=False, batch_size=2)
    with pytest.warns(UserWarning) as record:
        dm.prepare_data()
        dm.setup("fit")
    messages = [str(w.message) for w in record if "MIDI" in str(w.message)]
    assert messages == [f"data.path {folder}: skipped 1 of 6 MIDI files that music21 could not parse: broken.mid"]
    rolls = dm.load()
    assert [len(rolls[s]) for s in ("train", "valid", "test")] == list(split_counts(5)) == [3, 1, 1]
    assert sorted(n for s in dm.names for n in dm.names[s]) == sorted(written)
    for split in rolls:
        for name, roll in zip(dm.names[split], rolls[split]):
            assert roll.dtype == np.uint8 and roll.shape == written[name].shape
            np.testing.assert_array_equal(roll, written[name])
    x, lengths = next(iter(dm.val_dataloader()))
    assert x.shape == (1, 10, 88) and lengths.tolist() == [10]
    # at another time step the same file gives another roll: sampled, not copied
    np.testing.assert_array_equal(midi_to_roll(folder / "a.mid", steps_per_quarter=1), written["a.mid"][::2])


def test_the_split_is_fixed_by_the_sorted_files_not_the_order_they_were_found(tmp_path):
    folder = tmp_path / "songs"
    write_rolls(folder, [f"{i:02d}.mid" for i in range(6)], steps_per_quarter=1)
    _, names = load_quietly(folder, 1, tmp_path / "c1", progress=False)
    _, again = load_quietly(folder, 1, tmp_path / "c2", progress=False)  # converted again, elsewhere
    assert names == again and [len(names[s]) for s in ("train", "valid", "test")] == [4, 1, 1]
    assert all(names[s] == sorted(names[s]) for s in names)


def test_train_valid_test_subfolders_are_the_splits(tmp_path):
    folder = tmp_path / "JSB"
    write_rolls(folder / "train", ["x.mid", "sub/y.mid"], 1, seed=0)
    write_rolls(folder / "validation", ["v.mid"], 1, seed=2)
    write_rolls(folder / "test", ["t.mid"], 1, seed=3)
    write_rolls(folder, ["stray.mid"], 1, seed=4)  # outside the split folders: not used
    rolls, names = load_quietly(folder, 1, tmp_path / "cache", progress=False)
    assert names == {"train": ["train/sub/y.mid", "train/x.mid"], "valid": ["validation/v.mid"],
                     "test": ["test/t.mid"]}
    np.testing.assert_array_equal(rolls["valid"][0], random_roll(2))
    np.testing.assert_array_equal(rolls["train"][1], random_roll(0))


def test_a_partial_layout_and_two_valid_folders_are_one_line_errors(tmp_path):
    folder = tmp_path / "half"
    write_rolls(folder / "train", ["a.mid"], 1)
    write_rolls(folder / "test", ["b.mid"], 1)
    message = one_line_error(load_midi_folder, folder, cache_dir=tmp_path / "c", progress=False)
    assert "has train/, test/ but no valid/ or validation/ or val/" in message
    write_rolls(folder / "val", ["c.mid"], 1)
    write_rolls(folder / "valid", ["d.mid"], 1)
    assert "both valid/ and val/ found" in one_line_error(load_midi_folder, folder, cache_dir=tmp_path / "c")
    (folder / "valid" / "d.mid").unlink()
    (folder / "valid").rmdir()
    empty_val = folder / "val" / "c.mid"
    empty_val.unlink()
    message = one_line_error(load_midi_folder, folder, cache_dir=tmp_path / "c", progress=False)
    assert message == f"data.path {folder} (val/) has no MIDI files (.mid, .midi, searched in every subfolder)"


def test_a_folder_without_midi_files_is_a_one_line_error(tmp_path):
    folder = tmp_path / "empty"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "song.abc").write_text("X:1\n")
    message = one_line_error(ChoralesDataModule(path=str(folder), cache_dir=str(tmp_path / "c"),
                                                progress=False).load)
    assert message == f"data.path {folder} has no MIDI files (.mid, .midi, searched in every subfolder)"


def test_when_no_file_parses_it_is_a_one_line_error(tmp_path):
    folder = tmp_path / "junk"
    corrupt(folder / "a.mid", 1)
    corrupt(folder / "b.midi", 2)
    message = one_line_error(load_midi_folder, folder, cache_dir=tmp_path / "c", progress=False)
    assert message.startswith(f"data.path {folder}: music21 could not parse any of the 2 MIDI files (a.mid: ")


def test_too_few_files_for_three_splits(tmp_path):
    folder = tmp_path / "two"
    write_rolls(folder, ["a.mid", "b.mid"], 1)
    assert "2 usable MIDI file(s)" in one_line_error(load_midi_folder, folder, cache_dir=tmp_path / "c",
                                                      progress=False)


def test_the_conversion_is_cached_and_redone_when_a_file_or_the_time_step_changes(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "songs"
    write_rolls(folder, ["a.mid", "b.mid", "c.mid", "d.mid"], 1)
    corrupt(folder / "zz.mid")
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="skipped 1 of 5"):
        rolls, names = load_midi_folder(folder, 1, cache, progress=True)
    assert "Converting 5 MIDI files to piano rolls" in capsys.readouterr().err  # the progress bar
    entries = list(cache.glob("midi-songs-*.npz"))
    assert len(entries) == 1 and not list(cache.glob("*.tmp-*"))  # written atomically

    calls = []
    real = midi_folder.midi_to_roll

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(midi_folder, "midi_to_roll", no_conversion)
    with pytest.warns(UserWarning, match="skipped 1 of 5 MIDI files that music21 could not parse: zz.mid"):
        again, again_names = load_midi_folder(folder, 1, cache, progress=True)
    assert capsys.readouterr().err == ""  # no conversion, no bar
    assert again_names == names
    for split in rolls:
        for a, b in zip(rolls[split], again[split]):
            np.testing.assert_array_equal(a, b)

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(midi_folder, "midi_to_roll", counting)
    new = random_roll(9, steps=7)
    write_midi(new, folder / "b.mid", 1)
    os.utime(folder / "b.mid", ns=(10**18, 10**18))  # a new modification time whatever the clock's resolution
    with pytest.warns(UserWarning, match="skipped 1 of 5"):
        edited, edited_names = load_midi_folder(folder, 1, cache, progress=False)
    assert len(calls) == 5  # the edited folder is converted again
    b = [r for s in edited for r, n in zip(edited[s], edited_names[s]) if n == "b.mid"][0]
    np.testing.assert_array_equal(b, new)
    with pytest.warns(UserWarning, match="skipped 1 of 5"):
        load_midi_folder(folder, 2, cache, progress=False)
    assert len(calls) == 10  # another steps_per_quarter: converted again
    assert len(list(cache.glob("midi-songs-*.npz"))) == 3


def raw_midi(path: Path, notes: list[tuple[int, int, int, int]], tpq: int = 480) -> Path:
    """A one-track MIDI file of (channel, note, start tick, end tick), note-offs written as
    note-ons of velocity 0."""
    from music21 import midi

    track = midi.MidiTrack(1)
    events = sorted([(s, 1, c, n) for c, n, s, _ in notes] + [(e, 0, c, n) for c, n, _, e in notes])
    tick = 0
    for at, on, channel, note in events:
        track.events.append(midi.DeltaTime(track, time=at - tick))
        tick = at
        event = midi.MidiEvent(track, type=midi.ChannelVoiceMessages.NOTE_ON, channel=channel)
        event.pitch, event.velocity = note, 90 if on else 0
        track.events.append(event)
    track.events.append(midi.DeltaTime(track, time=0))
    end = midi.MidiEvent(track, type=midi.MetaEvents.END_OF_TRACK)
    end.data = b""
    track.events.append(end)
    mf = midi.MidiFile()
    mf.ticksPerQuarterNote = tpq
    mf.tracks.append(track)
    mf.open(str(path), "wb")
    try:
        mf.write()
    finally:
        mf.close()
    return path


def test_drums_and_notes_outside_the_piano_are_dropped_and_times_are_sampled(tmp_path):
    path = raw_midi(tmp_path / "raw.mid", [
        (1, 60, 0, 960),      # C4, a half note: steps 0, 1
        (2, 64, 240, 720),    # E4 from the off-beat eighth to beat 1.5: sounds at time 1 only
        (10, 38, 0, 1920),    # a snare on the drum channel: dropped
        (1, 20, 480, 960),    # below A0: dropped
        (1, 109, 480, 960),   # above C8: dropped
        (1, 108, 1440, 1920), # C8: step 3
        (1, 67, 1200, 1300),  # shorter than a step, between two samples: not seen
    ])
    roll = midi_to_roll(path, steps_per_quarter=1)
    on = {t: sorted(int(i) + 21 for i in np.flatnonzero(roll[t])) for t in range(len(roll))}
    assert on == {0: [60], 1: [60, 64], 2: [], 3: [108]}
    assert midi_to_roll(path, steps_per_quarter=4)[10, 67 - 21] == 1  # at 1/16 it is seen (time 2.5)


@pytest.mark.slow
def test_the_music_model_trains_and_samples_from_a_midi_folder_through_the_cli(in_tmp_dir):
    """The README's "Your own data" commands on a folder the project wrote itself."""
    from seqmodels.cli import main

    folder = in_tmp_dir / "my_midi"
    write_rolls(folder, [f"piece{i}.mid" for i in range(6)], steps_per_quarter=2)
    corrupt(folder / "broken.mid")
    config = Path(__file__).resolve().parents[1] / "configs" / "chorales_lstm.yaml"
    args = ["--config", str(config), f"--data.init_args.path={folder}",
            "--data.init_args.steps_per_quarter=2", f"--data.init_args.cache_dir={in_tmp_dir / 'cache'}",
            "--model.init_args.network.hidden_size=8"]
    with pytest.warns(UserWarning, match="skipped 1 of 7 MIDI files"):
        cli = main(["fit", *args, "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false"])
    assert cli.trainer.current_epoch == 2 and np.isfinite(float(cli.trainer.callback_metrics["val/nll"]))
    assert sorted(cli.datamodule.names["train"] + cli.datamodule.names["valid"] + cli.datamodule.names["test"]) == \
        [f"piece{i}.mid" for i in range(6)]
    main(["sample", *args, "--ckpt_path=last", "--prime_frames=2", "--length=6", f"--output={in_tmp_dir / 'out'}"])
    written = list((in_tmp_dir / "out").glob("*.mid"))
    assert len(written) == 1 and midi_to_roll(written[0], 2).shape[1] == 88
