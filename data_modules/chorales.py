"""Polyphonic music as binary piano rolls (``seqmodels.formats``), for the polyphonic-music
task: the DataModule, its datasets and samplers.

Sources, in this order of precedence:
    path   a canonical file (Boulanger-Lewandowski pickle or TCN-benchmark .mat, its format
           detected from the content: ``music_formats.load_file``), or a folder of MIDI files
           (.mid, .midi, at any depth), converted once at ``steps_per_quarter`` and cached under
           ``cache_dir`` (``midi_folder.load_midi_folder``).
    url    a file in one of those formats, downloaded once into ``cache_dir/downloads``; used when
           path is unset or does not exist.
    (none) the four-part Bach chorales shipped with music21 (``bach_corpus.load_corpus``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from data_modules.bach_corpus import load_corpus
from data_modules.midi_folder import load_midi_folder
from data_modules.music_formats import Rolls, download, load_file, missing_path_message
from data_modules.resumable import ResumableLoader, epoch_of, rank_and_world, shuffled_loader

from seqmodels.caches import default_cache_dir
from seqmodels.errors import ConfigError
from seqmodels.formats import N_PITCHES, rru_windows


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
        train_window: cut each training sequence into windows of this many predicted frames,
            each trained from the zero state (as the RRU paper's code trains); null: whole
            sequences. Validation and test always run whole sequences (the published NLL).
        train_window_step: frames between the starts of two windows (default half a window:
            they overlap by half, as the RRU paper's).

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
        train_window: int | None = None,
        train_window_step: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("train_window", train_window), ("train_window_step", train_window_step)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"data.{name} must be an integer >= 1 (frames) or null, got {value!r}")
        if train_window_step is not None and train_window is None:
            raise ConfigError(f"data.train_window_step: {train_window_step} needs data.train_window (frames a "
                              "window predicts); set it, or leave out train_window_step")
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
        """The splits the stage uses: fit trains and validates, and never reads the test split
        (a hyperparameter search relies on it: ``seqmodels.search``); None builds all three."""
        rolls = self.load()
        if stage in (None, "fit"):
            train = rolls["train"]
            window = self.hparams.get("train_window")
            if window:
                step = self.hparams.get("train_window_step") or max(1, window // 2)
                train = [r[a:b + 1] for r in train for a, b in rru_windows(len(r), window, step)]
            self.train_set = RollDataset(train)
        if stage in (None, "fit", "validate"):
            self.val_set = RollDataset(rolls["valid"])
        if stage in (None, "test", "predict"):
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
        if getattr(self, "test_set", None) is None:  # set up for fit only: the test split is read now
            self.setup("test")
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
