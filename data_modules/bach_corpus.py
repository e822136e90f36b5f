"""The four-part Bach chorales shipped with music21 (embedded, offline) as piano rolls per split
(``load_corpus``): sampled at ``steps_per_quarter`` steps per quarter note, split 60/20/20 by
chorale (fixed order, fixed seed), converted once and cached with ``datasets``."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from data_modules.music_formats import SPLIT_SEED, Rolls, check_rolls, split_counts, spans_to_roll

from seqmodels.caches import default_cache_dir
from seqmodels.errors import ConfigError
from seqmodels.formats import LOWEST_NOTE, N_PITCHES

CORPUS_CACHE_VERSION = 1  # bump when the conversion below changes
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
