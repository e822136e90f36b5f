"""A folder of MIDI files as piano rolls per split (``load_midi_folder``), each file read with
music21's MIDI reader (``midi_to_roll``), the conversion cached once per folder state."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from data_modules.music_formats import SPLIT_SEED, SPLITS, Rolls, check_rolls, split_counts, spans_to_roll

from seqmodels.caches import default_cache_dir
from seqmodels.errors import ConfigError
from seqmodels.formats import N_PITCHES

MIDI_SUFFIXES = (".mid", ".midi")
MIDI_CACHE_VERSION = 1  # bump when midi_to_roll changes
PERCUSSION_CHANNEL = 10  # General MIDI drums: hits, not pitches
SPLIT_FOLDERS = {"train": ("train",), "valid": ("valid", "validation", "val"), "test": ("test",)}


def midi_to_roll(path: str | Path, steps_per_quarter: float = 1.0) -> np.ndarray:
    """A MIDI file -> (T, 88) uint8 roll, read with music21's MIDI file reader: every note
    (note-on .. note-off, all tracks and channels but the drums of channel 10) at its exact time
    in quarter notes (ticks / ticks per quarter note; tempo does not matter), sampled like the
    embedded corpus (``spans_to_roll``). Notes outside 21..108 are dropped; a note never switched
    off ends with its track. Raises on a file music21 cannot read."""
    from music21 import midi

    mf = midi.MidiFile()
    mf.readstr(Path(path).read_bytes())
    if mf.ticksPerSecond:
        raise ValueError("SMPTE time division: no quarter-note grid")
    tpq = float(mf.ticksPerQuarterNote)
    if tpq <= 0:
        raise ValueError(f"{tpq:g} ticks per quarter note")
    spans = []
    for track in mf.tracks:
        tick, sounding = 0, {}  # (channel, note) -> start ticks, oldest first
        for event in track.events:
            if isinstance(event, midi.DeltaTime):
                tick += event.time
            elif event.channel == PERCUSSION_CHANNEL:
                continue
            elif event.isNoteOn():
                sounding.setdefault((event.channel, event.pitch), []).append(tick)
            elif event.isNoteOff() and sounding.get((event.channel, event.pitch)):
                spans.append((sounding[(event.channel, event.pitch)].pop(0) / tpq, tick / tpq, event.pitch))
        spans += [(start / tpq, tick / tpq, note) for (_, note), starts in sounding.items() for start in starts]
    return spans_to_roll(spans, steps_per_quarter)


def midi_files(folder: Path) -> list[Path]:
    """The MIDI files below ``folder`` (any depth), sorted by their path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and p.is_file())


def _split_folders(folder: Path) -> dict[str, Path] | None:
    """{split: subfolder} when ``folder`` has train/, valid/ (validation/, val/) and test/; None
    when it has none of them; a one-line error when only some, or two names for one split."""
    children = {c.name.lower(): c for c in folder.iterdir() if c.is_dir()} if folder.is_dir() else {}
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        present = [children[n] for n in names if n in children]
        if len(present) > 1:
            raise ConfigError(f"data.path {folder}: both {' and '.join(p.name + '/' for p in present)} found; "
                              f"keep one folder for the '{split}' split")
        if present:
            found[split] = present[0]
    if not found:
        return None
    if len(found) < 3:
        missing = [" or ".join(n + "/" for n in SPLIT_FOLDERS[s]) for s in SPLITS if s not in found]
        raise ConfigError(f"data.path {folder}: has {', '.join(found[s].name + '/' for s in SPLITS if s in found)} "
                          f"but no {' and no '.join(missing)}; give all three split folders, or none (then "
                          "the files are split 60/20/20)")
    return found


def _names(paths: list[str], most: int = 3) -> str:
    more = f" (and {len(paths) - most} more)" if len(paths) > most else ""
    return ", ".join(paths[:most]) + more


def convert_midi_files(folder: Path, rel_paths: list[str], steps_per_quarter: float,
                       progress: bool = True) -> tuple[list[str], list[np.ndarray], list[str], list[str], str]:
    """Convert every file: (kept names, their rolls, unparsable names, too-short names, the first
    parse error)."""
    from tqdm.auto import tqdm

    kept, rolls, bad, short, first_error = [], [], [], [], ""
    bar = tqdm(rel_paths, desc=f"Converting {len(rel_paths)} MIDI files to piano rolls (once)", unit="file",
               disable=not progress)
    for rel in bar:
        try:
            roll = midi_to_roll(folder / rel, steps_per_quarter)
        except Exception as err:  # noqa: BLE001 (a damaged file can fail in many ways)
            bad.append(rel)
            first_error = first_error or f"{rel}: {type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"
            continue
        if len(roll) < 2:
            short.append(rel)
            continue
        kept.append(rel)
        rolls.append(roll)
    bar.close()
    return kept, rolls, bad, short, first_error


def _write_npz_atomically(target: Path, **arrays) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=target.name + ".tmp-", delete=False) as tmp:
        try:
            np.savez_compressed(tmp, **arrays)
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, target)


def load_midi_folder(folder: str | Path, steps_per_quarter: float = 1.0, cache_dir: str | Path | None = None,
                     progress: bool = True) -> tuple[Rolls, dict[str, list[str]]]:
    """A folder of MIDI files as rolls per split, and the files (relative paths) per split.

    Splits: the train/, valid/ (or validation/, val/) and test/ subfolders when the folder has
    them (files elsewhere are not used); otherwise the files that convert, sorted by path and
    permuted with the embedded corpus's fixed seed, split 60/20/20 (``split_counts``). The
    conversion is cached in ``cache_dir`` under a key made of the folder, every file's path,
    size and modification time, ``steps_per_quarter`` and the music21 version: an edited folder
    is converted again. Files music21 cannot read, or with fewer than 2 steps, are skipped with
    one warning; when no file is left, a one-line ``ConfigError``.
    """
    import music21

    folder = Path(folder).expanduser()
    layout = _split_folders(folder)
    roots = layout or {None: folder}
    split_of, rel_paths = {}, []
    for split, root in roots.items():
        found = midi_files(root)
        if not found:
            where = f"{folder} ({root.name}/)" if split else str(folder)
            raise ConfigError(f"data.path {where} has no MIDI files ({', '.join(MIDI_SUFFIXES)}, searched "
                              "in every subfolder)")
        for p in found:
            rel = p.relative_to(folder).as_posix()
            split_of[rel] = split
            rel_paths.append(rel)
    listing = []
    for rel in rel_paths:
        st = (folder / rel).stat()
        listing.append([rel, st.st_size, st.st_mtime_ns])
    key = hashlib.sha256(json.dumps({
        "version": MIDI_CACHE_VERSION, "folder": str(folder.resolve()), "files": listing,
        "steps_per_quarter": float(steps_per_quarter), "music21": music21.__version__}).encode()).hexdigest()
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    where = cache_dir / f"midi-{folder.resolve().name or 'root'}-{key[:16]}.npz"
    if where.is_file():
        with np.load(where, allow_pickle=False) as z:
            kept, lengths = z["names"].tolist(), z["lengths"]
            frames = z["rolls"]
            bad, short, first_error = z["bad"].tolist(), z["short"].tolist(), str(z["first_error"])
        rolls_kept = np.split(frames, np.cumsum(lengths)[:-1]) if len(lengths) else []
    else:
        kept, rolls_kept, bad, short, first_error = convert_midi_files(folder, rel_paths, steps_per_quarter,
                                                                       progress)
        _write_npz_atomically(
            where, names=np.array(kept, dtype=str), lengths=np.array([len(r) for r in rolls_kept], dtype=np.int64),
            rolls=(np.concatenate(rolls_kept) if rolls_kept else np.zeros((0, N_PITCHES), np.uint8)),
            bad=np.array(bad, dtype=str), short=np.array(short, dtype=str), first_error=np.array(first_error))
    n = len(rel_paths)
    if not kept:
        if not short:
            raise ConfigError(f"data.path {folder}: music21 could not parse any of the {n} MIDI files "
                              f"({first_error})")
        why = [f"music21 could not parse {len(bad)} ({_names(bad)})"] if bad else []
        why.append(f"{len(short)} {'has' if len(short) == 1 else 'have'} fewer than 2 time steps at "
                   f"steps_per_quarter {steps_per_quarter:g} ({_names(short)})")
        raise ConfigError(f"data.path {folder}: none of the {n} MIDI files gave a piano roll: {'; '.join(why)}")
    skipped = []
    if bad:
        skipped.append(f"skipped {len(bad)} of {n} MIDI files that music21 could not parse: {_names(bad)}")
    if short:
        skipped.append(f"skipped {len(short)} of {n} MIDI files with fewer than 2 time steps at "
                       f"steps_per_quarter {steps_per_quarter:g}: {_names(short)}")
    if skipped:
        warnings.warn(f"data.path {folder}: {'; '.join(skipped)}", UserWarning, stacklevel=2)
    if layout:
        parts = {s: [i for i, rel in enumerate(kept) if split_of[rel] == s] for s in SPLITS}
    else:
        if len(kept) < 3:
            raise ConfigError(f"data.path {folder}: {len(kept)} usable MIDI file(s); a folder without train/, "
                              "valid/ and test/ subfolders needs at least 3 (one per split)")
        order = np.random.default_rng(SPLIT_SEED).permutation(len(kept))
        n_train, n_valid, _ = split_counts(len(kept))
        parts = {"train": sorted(order[:n_train]), "valid": sorted(order[n_train:n_train + n_valid]),
                 "test": sorted(order[n_train + n_valid:])}
    rolls = {s: [rolls_kept[i] for i in idx] for s, idx in parts.items()}
    names = {s: [kept[i] for i in idx] for s, idx in parts.items()}
    check_rolls(rolls, f"the MIDI files in {folder}")
    return rolls, names
