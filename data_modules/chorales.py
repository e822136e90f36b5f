"""Polyphonic music as binary piano rolls: the Bach chorales of the music21 corpus (embedded,
offline) or the canonical benchmark files (JSB Chorales, Nottingham, MuseData, Piano-midi.de).

A piano roll is a (T, 88) uint8 array: one row per time step, column i = MIDI note 21 + i
(A0 .. C8), 1 where the note sounds during that step.

Sources, in this order of precedence:
    path   a canonical file, its format detected from the content:
           - the Boulanger-Lewandowski pickle: {"train", "valid", "test"} -> list of sequences,
             each a list of time steps, each a tuple/list of MIDI note numbers (maybe empty);
             read with a restricted unpickler that builds plain data only (no code can run);
           - the MATLAB .mat of the TCN benchmark: "traindata", "validdata", "testdata", each a
             1 x N object array of (T, 88) 0/1 arrays.
    url    a file in one of those formats, downloaded once into ``cache_dir/downloads``.
    (none) the four-part Bach chorales shipped with music21, sampled at ``steps_per_quarter``
           steps per quarter note, split 60/20/20 by chorale (fixed order, fixed seed),
           converted once and cached with ``datasets`` under ``cache_dir``.
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
from typing import Callable

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from data_modules.resumable import ResumableLoader, epoch_of, rank_and_world, shuffled_loader

from seqmodels.errors import ConfigError

LOWEST_NOTE, HIGHEST_NOTE = 21, 108  # A0 .. C8
N_PITCHES = HIGHEST_NOTE - LOWEST_NOTE + 1  # 88
SPLITS = ("train", "valid", "test")
MAT_KEYS = {"train": "traindata", "valid": "validdata", "test": "testdata"}
CORPUS_CACHE_VERSION = 1  # bump when the conversion below changes
SPLIT_SEED = 0  # the permutation of the embedded chorales into train / valid / test

Rolls = dict[str, list[np.ndarray]]  # split -> list of (T, 88) uint8 piano rolls


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "seqmodels"


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
    if not path.is_file():
        raise ConfigError(f"data.path {path} does not exist; pass a JSB_Chorales.pickle/.mat file "
                          "(or leave data.path unset for the embedded music21 Bach chorales)")
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


def score_to_roll(parts: list, steps_per_quarter: float = 1.0) -> np.ndarray:
    """Sample the parts at the start of every step: a note sounds in step t when it sounds at
    time t / steps_per_quarter (quarter notes), so a held or tied note sounds in every step
    it covers and a note shorter than a step may fall between two samples."""
    step = 1.0 / steps_per_quarter
    eps = 1e-9
    events = []
    for part in parts:
        for n in part.flatten().notes:
            start, dur = float(n.offset), float(n.quarterLength)
            if dur <= 0:  # grace notes
                continue
            first = math.ceil(start / step - eps)
            end = math.ceil((start + dur) / step - eps)
            for pitch in n.pitches:
                events.append((first, end, int(pitch.midi)))
    total = max((e for _, e, _ in events), default=0)
    roll = np.zeros((total, N_PITCHES), dtype=np.uint8)
    for first, end, midi in events:
        if LOWEST_NOTE <= midi <= HIGHEST_NOTE and end > first:
            roll[first:end, midi - LOWEST_NOTE] = 1
    return roll


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
            Chorales, Nottingham, MuseData, Piano-midi.de). Unset: the embedded chorales.
        url: a canonical file to download once into ``cache_dir/downloads`` (when no path).
        steps_per_quarter: time steps per quarter note, for the embedded corpus (sampling)
            and for writing MIDI; the canonical JSB file has 1.
        max_chorales: convert only the first N chorales of the corpus (quick tests).
        cache_dir: where the converted corpus and downloads go (default ~/.cache/seqmodels).
        batch_size, num_workers: the DataLoaders'.
        length_buckets: > 1 batches training sequences of similar lengths together (see
            ``LengthBucketSampler``; chunks of this many batches); 1 plain shuffling.
        progress: show a progress bar while converting the corpus.
        seed: the shuffling seed (each epoch's order is drawn from seed and epoch).

    Under DDP each rank trains on its own share (torch's ``DistributedSampler``); length
    buckets apply with one process only.
    """

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
        if path is not None and not Path(path).expanduser().is_file():
            raise ConfigError(f"data.path {path} does not exist; pass a JSB_Chorales.pickle/.mat file "
                              "(or leave data.path unset for the embedded music21 Bach chorales)")
        self.save_hyperparameters(logger=False)  # the CLI logs the whole config once
        self.path, self.url = path, url
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
            if self.path:
                self.rolls = load_file(self.path)
            elif self.url:
                self.rolls = load_file(download(self.url, cache))
            else:
                self.rolls, self.names = load_corpus(self.steps_per_quarter, hp.max_chorales, cache,
                                                     hp.progress)
        return self.rolls

    def prepare_data(self) -> None:
        if not self.path and not self.url:  # convert and cache the corpus in one process
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
