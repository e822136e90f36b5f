"""Where the text comes from and where its caches go: datasets' cache follows HF_DATASETS_CACHE /
HF_HOME, a Hub dataset keeps its own splits (re-split only when asked or when it lacks one),
and data.path takes http(s) URLs (served here by a local HTTP server: no test uses the network)."""
from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from data_modules.text import CharTextDataModule, decode, list_text_files
from seqmodels.errors import ConfigError
from tests.conftest import ROOT

TRAIN = "".join(f"train line {i}: to be or not to be\n" for i in range(60))
VALID = "".join(f"valid line {i}: the question\n" for i in range(10)) + "\nafter a blank line\n"
TEST = "".join(f"test line {i}: whether 'tis nobler\n" for i in range(10)) + "Zq\n"  # Z, q only in test


def use_tmp_datasets_cache(tmp_path, monkeypatch):
    """datasets' default cache in this test's folder (the variables are read when datasets is
    imported, so its config is patched too), online, and no proxy for the local server."""
    import datasets

    cache = tmp_path / "hf_datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", cache / "downloads" / "extracted")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return cache


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    return use_tmp_datasets_cache(tmp_path, monkeypatch)


def dm_for(tmp_path, **kwargs) -> CharTextDataModule:
    return CharTextDataModule(**{"batch_size": 2, "eval_batch_size": 2, "bptt": 8,
                                 "cache_dir": str(tmp_path / "own"), **kwargs})


def split_text(dm, split):
    return decode(dm.split_ids(split), dm.vocab)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


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


@pytest.mark.slow  # a fresh process (~5 s)
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


# ---- Hub datasets: their own splits -----------------------------------------------------------
def text_dataset(folder, files: dict[str, str]):
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_hub_dataset_with_its_own_splits_keeps_them(tmp_path):
    folder = text_dataset(tmp_path / "ds", {"train.txt": TRAIN, "validation.txt": VALID, "test.txt": TEST})
    dm = dm_for(tmp_path, hub=str(folder))
    assert dm.texts() == {"train": TRAIN, "val": VALID, "test": TEST}
    assert dm.vocab == ["<unk>", *sorted(set(TRAIN))]  # the training split's characters only
    for split, text in (("train", TRAIN), ("val", VALID), ("test", TEST)):
        assert split_text(dm, split) == "".join(c if c in dm.vocab else "\ufffd" for c in text)
    assert "Z" not in dm.vocab and split_text(dm, "test").endswith("\ufffd\ufffd\n")


def test_hub_dataset_resplit_on_request_or_without_val_and_test(tmp_path):
    folder = text_dataset(tmp_path / "ds", {"train.txt": TRAIN, "validation.txt": VALID, "test.txt": TEST})
    n = len(TRAIN)
    expected = {"train": TRAIN[: int(0.8 * n)], "val": TRAIN[int(0.8 * n): int(0.9 * n)], "test": TRAIN[int(0.9 * n):]}
    assert dm_for(tmp_path, hub=str(folder), resplit=True, fractions=(0.8, 0.1, 0.1)).texts() == expected
    only_train = text_dataset(tmp_path / "only", {"train.txt": TRAIN})
    assert dm_for(tmp_path, hub=str(only_train), fractions=(0.8, 0.1, 0.1)).texts() == expected
    no_val = text_dataset(tmp_path / "noval", {"train.txt": TRAIN, "test.txt": TEST})
    assert dm_for(tmp_path, hub=str(no_val), fractions=(0.8, 0.1, 0.1)).texts() == expected


CONFIGS = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: a.txt
  - split: valid
    path: b.txt
  - split: test
    path: c.txt
---
"""


def test_hub_split_names_are_mapped_or_given(tmp_path):
    folder = text_dataset(tmp_path / "named", {"README.md": CONFIGS, "a.txt": TRAIN, "b.txt": VALID, "c.txt": TEST})
    assert dm_for(tmp_path, hub=str(folder)).texts() == {"train": TRAIN, "val": VALID, "test": TEST}  # 'valid'
    swapped = dm_for(tmp_path, hub=str(folder), hub_splits={"train": "train", "val": "test", "test": "valid"})
    assert swapped.texts() == {"train": TRAIN, "val": TEST, "test": VALID}
    concatenated = dm_for(tmp_path, hub=str(folder), hub_splits=["valid", "train"], fractions=(1.0, 0.0, 0.0))
    assert concatenated.texts()["train"] == VALID + TRAIN  # the former list form: concatenated, re-split
    with pytest.raises(ConfigError) as excinfo:
        dm_for(tmp_path, hub=str(folder), hub_splits={"train": "train", "val": "validation", "test": "test"}).prepare()
    assert "has no split 'validation' (splits: ['train', 'valid', 'test'])" in one_line_error(excinfo)
    with pytest.raises(ConfigError) as excinfo:
        dm_for(tmp_path, hub=str(folder), hub_splits={"train": "train", "test": "test"}).prepare()
    assert "data.hub_splits maps train, val and test" in one_line_error(excinfo)
    no_train = text_dataset(tmp_path / "notrain", {"validation.txt": VALID, "test.txt": TEST})
    with pytest.raises(ConfigError) as excinfo:
        dm_for(tmp_path, hub=str(no_train)).prepare()
    assert "has no train split" in one_line_error(excinfo)


TWO_CONFIGS = """---
configs:
- config_name: small
  data_files:
  - split: train
    path: a.txt
  - split: validation
    path: b.txt
  - split: test
    path: c.txt
  default: true
- config_name: swapped
  data_files:
  - split: train
    path: a.txt
  - split: validation
    path: c.txt
  - split: test
    path: b.txt
---
"""


def test_hub_config_picks_one_of_a_datasets_configurations(tmp_path):
    """data.hub_config is load_dataset's second argument (wikitext's 'wikitext-2-raw-v1')."""
    folder = text_dataset(tmp_path / "configs", {"README.md": TWO_CONFIGS, "a.txt": TRAIN, "b.txt": VALID,
                                                 "c.txt": TEST})
    assert dm_for(tmp_path, hub=str(folder)).texts() == {"train": TRAIN, "val": VALID, "test": TEST}
    assert dm_for(tmp_path, hub=str(folder), hub_config="swapped").texts() == {"train": TRAIN, "val": TEST,
                                                                              "test": VALID}
    with pytest.raises(ConfigError) as excinfo:
        dm_for(tmp_path, hub=str(folder), hub_config="nope").prepare()
    assert "nope" in one_line_error(excinfo)


def test_hub_rows_are_joined_by_line_breaks(tmp_path):
    """A text dataset's rows are its lines without their line break: the split is the file again."""
    folder = text_dataset(tmp_path / "ds", {"train.txt": TRAIN, "validation.txt": VALID, "test.txt": TEST})
    assert dm_for(tmp_path, hub=str(folder)).texts()["val"] == VALID
    import datasets

    assert list(datasets.load_dataset(str(folder), split="validation")["text"]) == VALID.splitlines()


def test_hub_json_rows_with_their_own_line_breaks_and_another_column(tmp_path):
    folder = tmp_path / "hubds"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for i in range(400):
            f.write(json.dumps({"content": f"line {i} of the hub text\n"}) + "\n")
    dm = dm_for(tmp_path, hub=str(folder), column="content")
    assert split_text(dm, "train").startswith("line 0 of the hub text\nline 1 of")  # no second line break
    with pytest.raises(ConfigError) as excinfo:
        dm_for(tmp_path, hub=str(folder)).prepare()
    assert "data.column 'text' is not in dataset" in one_line_error(excinfo)


@pytest.mark.parametrize("variable", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
def test_hub_name_offline_is_one_line(tmp_path, monkeypatch, variable):
    import datasets

    monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as excinfo:
        dm_for(tmp_path, hub="karpathy/tiny_shakespeare").prepare()
    message = one_line_error(excinfo)
    assert "'karpathy/tiny_shakespeare'" in message and "data.path" in message


# ---- URLs -------------------------------------------------------------------------------------
class QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()

    def do_HEAD(self):
        self.requests.append(self.path)
        super().do_HEAD()


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www; .requests lists the paths asked for."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []
    handler = functools.partial(type("Handler", (QuietHandler,), {"requests": requests}), directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.root, httpd.url, httpd.requests = root, f"http://127.0.0.1:{httpd.server_port}", requests
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.slow
def test_url_is_downloaded_into_datasets_cache_and_read(server, tmp_path, datasets_cache, corpus):
    (server.root / "plays.txt").write_text(TRAIN, encoding="utf-8")
    url = f"{server.url}/plays.txt"
    dm = dm_for(tmp_path, path=url, fractions=(1.0, 0.0, 0.0))
    assert dm.texts()["train"] == TRAIN
    assert any(f.name.endswith(".json") for f in (datasets_cache / "downloads").iterdir())  # the download's record
    mixed = dm_for(tmp_path, path=[str(corpus), url, str(corpus)], fractions=(1.0, 0.0, 0.0))
    assert mixed.texts()["train"] == TRAIN * 3 + TRAIN + TRAIN * 3  # files and URLs, in the order given
    assert list_text_files([url, str(corpus)]) == [url, corpus]


def test_unreachable_url_is_one_line_and_fast(tmp_path):
    url = "http://127.0.0.1:9/x.txt"  # the discard port: nothing listens there
    start = time.perf_counter()
    with pytest.raises(ConfigError) as excinfo:
        dm_for(tmp_path, path=url).prepare()
    assert time.perf_counter() - start < 20
    message = one_line_error(excinfo)
    assert f"data.path URL {url} cannot be downloaded" in message and "refused" in message.lower()
    assert "download the file on a machine with network and pass the local file as data.path" in message


def test_url_errors_name_the_reason(server, tmp_path):
    (server.root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 20)
    (server.root / "empty.txt").write_text("  \n")
    for name, reason in [("missing.txt", "(HTTP 404 File not found)"),
                         ("latin1.txt", "is not UTF-8 (byte 0xe9 at offset 3)"),
                         ("empty.txt", "is empty")]:
        with pytest.raises(ConfigError) as excinfo:
            dm_for(tmp_path, path=f"{server.url}/{name}").prepare()
        message = one_line_error(excinfo)
        assert f"data.path URL {server.url}/{name} " in message and reason in message, message


@pytest.mark.parametrize("variable", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
def test_url_offline_is_one_line_and_asks_nothing(server, tmp_path, monkeypatch, variable):
    (server.root / "plays.txt").write_text(TRAIN, encoding="utf-8")
    monkeypatch.setenv(variable, "1")
    with pytest.raises(ConfigError) as excinfo:
        dm_for(tmp_path, path=f"{server.url}/plays.txt").prepare()
    message = one_line_error(excinfo)
    assert f"{server.url}/plays.txt" in message and "offline mode is on" in message and "data.path" in message
    assert server.requests == []
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # datasets' own variable wins over HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dm_for(tmp_path, path=f"{server.url}/plays.txt", fractions=(1.0, 0.0, 0.0)).texts()["train"] == TRAIN


def test_cli_parses_the_split_mapping_and_resplit(in_tmp_dir, capsys):
    """The options as a user writes them on the command line reach the module as they read."""
    import yaml

    from seqmodels.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "shakespeare_rnn.yaml"), "--data.init_args.hub=some/dataset",
              "--data.init_args.hub_splits={train: train, val: dev, test: test}", "--data.init_args.resplit=true",
              "--data.init_args.path=https://example.org/plays.txt", "--print_config"])
    assert exit_info.value.code == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert data["hub_splits"] == {"train": "train", "val": "dev", "test": "test"} and data["resplit"] is True
    assert data["path"] == "https://example.org/plays.txt" and data["datasets_cache_dir"] is None
