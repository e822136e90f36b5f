"""Where the text's caches go: datasets' cache follows HF_DATASETS_CACHE / HF_HOME, the
project's own follows data.cache_dir (XDG_CACHE_HOME)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from data_modules.text import CharTextDataModule
from tests.conftest import ROOT

TRAIN = "".join(f"train line {i}: to be or not to be\n" for i in range(60))


def use_tmp_datasets_cache(tmp_path, monkeypatch):
    """datasets' default cache in this test's folder (the variables are read when datasets is
    imported, so its config is patched too), online."""
    import datasets

    cache = tmp_path / "hf_datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", cache / "downloads" / "extracted")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    return cache


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    return use_tmp_datasets_cache(tmp_path, monkeypatch)


def dm_for(tmp_path, **kwargs) -> CharTextDataModule:
    return CharTextDataModule(**{"batch_size": 2, "eval_batch_size": 2, "bptt": 8,
                                 "cache_dir": str(tmp_path / "own"), **kwargs})


# ---- caches ---------------------------------------------------------------------------------
@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TRAIN * 3, encoding="utf-8")
    return path


def test_datasets_cache_follows_hf_datasets_cache_not_data_cache_dir(corpus, tmp_path, datasets_cache):
    dm = dm_for(tmp_path, path=str(corpus))
    dm.prepare()
    assert list(datasets_cache.rglob("*.arrow")), "datasets' Arrow cache is not under HF_DATASETS_CACHE"
    own = tmp_path / "own"
    assert not list(own.rglob("*.arrow")) and not (own / "datasets").exists()
    assert len(list(own.glob("text/*/train.npy"))) == 1  # the project's own cache stays in data.cache_dir


def test_datasets_cache_dir_option_overrides_the_environment(corpus, tmp_path, datasets_cache):
    dm_for(tmp_path, path=str(corpus), datasets_cache_dir=str(tmp_path / "explicit")).prepare()
    assert list((tmp_path / "explicit").rglob("*.arrow"))
    assert not list(datasets_cache.rglob("*.arrow"))


def test_hf_home_and_xdg_cache_home_in_a_fresh_process(corpus, tmp_path):
    """HF_HOME read by datasets at import (no patching), XDG_CACHE_HOME for the project's cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_DATASETS_CACHE", "HF_HOME", "XDG_CACHE_HOME")}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf_home"), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    code = ("from data_modules.text import CharTextDataModule\n"
            f"CharTextDataModule(path={str(corpus)!r}, batch_size=2).prepare()\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "hf_home" / "datasets").rglob("*.arrow"))
    assert len(list((tmp_path / "xdg" / "seqmodels" / "text").glob("*/train.npy"))) == 1
    assert not list((tmp_path / "xdg").rglob("*.arrow"))
