"""Character-level LM: play-text conversion, splits, vocabulary and <unk>, stateful TBPTT,
sampling, bad input, and the CLI end to end (sources and caches: test_text_sources.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_modules.text import (CharTextDataModule, RandomWindows, StreamBatches, build_vocab, decode,
                               embedded_plays, encode, markdown_play_to_text)
from seqmodels.cli import main
from seqmodels.errors import ConfigError
from seqmodels.sampling import generate_text
from seqmodels.tasks import CharLanguageModel, NetworkConfig
from tests.conftest import ROOT
from tests.test_text_sources import use_tmp_datasets_cache

SNIPPET = """# Macbeth

## ACT I

## SCENE I. A desert place.

_Thunder and lightning. Enter three Witches_

**First Witch**  
When shall we three meet again  
In thunder, lightning, or in rain?

_\\[To FABIAN]_  
**Second Witch**  
__\\[Aside]_  
When the hurlyburly's done,\\--  
When the battle's lost and won.  
_Exit_

*Enter King Edward, Derby, and
Artois.*
"""


def test_markdown_to_play_text():
    assert markdown_play_to_text(SNIPPET) == (
        "First Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n\n"
        "Second Witch:\nWhen the hurlyburly's done,--\nWhen the battle's lost and won.\n")


def test_embedded_corpus_is_clean_play_text():
    plays = embedded_plays()
    assert len(plays) == 38 and plays[0][0] == "comedies/a-midsummer-night-s-dream"
    text = "".join(t for _, t in plays)
    assert not set("_*#[\\") & set(text)
    assert plays[0][1].startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    return use_tmp_datasets_cache(tmp_path, monkeypatch)


@pytest.fixture
def text_file(tmp_path):
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "the", "question", "ROMEO:", "JULIET:", "\n", "\n\n"]
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(rng.choice(words, size=6000)) + "\n", encoding="utf-8")
    return path


def make_dm(path, tmp_path, **kwargs) -> CharTextDataModule:
    kwargs = {"batch_size": 4, "eval_batch_size": 4, "bptt": 16, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return CharTextDataModule(path=str(path), **kwargs)


def test_splits_by_position_and_deterministic(text_file, tmp_path):
    a, b = make_dm(text_file, tmp_path), make_dm(text_file, tmp_path / "other")
    text = text_file.read_text()
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.split_ids(split), b.split_ids(split))
    n = len(text)
    assert decode(a.split_ids("train"), a.vocab) == text[: int(0.9 * n)]
    assert decode(a.split_ids("test"), a.vocab) == text[int(0.95 * n):]


def test_embedded_val_and_test_are_whole_unseen_plays():
    dm = CharTextDataModule()
    plays = embedded_plays()
    texts = dm.split_texts(plays)
    play_texts = [t for _, t in plays]
    for split in ("val", "test"):
        whole = [t for t in play_texts if t in texts[split]]
        assert whole and "\n".join(whole) == texts[split]
        assert not any(t in texts["train"] for t in whole)


def test_encoding_cache_is_keyed_by_content(text_file, tmp_path):
    dm = make_dm(text_file, tmp_path)
    dm.prepare()
    folders = list((tmp_path / "cache" / "text").iterdir())
    assert len(folders) == 1
    again = make_dm(text_file, tmp_path)
    np.testing.assert_array_equal(again.split_ids("train"), dm.split_ids("train"))
    assert isinstance(again.split_ids("train"), np.memmap)  # loaded from the cache
    text_file.write_text(text_file.read_text() + "a changed file\n", encoding="utf-8")
    changed = make_dm(text_file, tmp_path)
    changed.prepare()
    assert len(list((tmp_path / "cache" / "text").iterdir())) == 2
    expected = "".join(c if c in changed.vocab else "\ufffd" for c in "a changed file\n")
    assert decode(changed.split_ids("test"), changed.vocab).endswith(expected)


def test_unknown_characters_map_to_unk_and_never_crash(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcabcabc" * 200 + "xyz" * 30, encoding="utf-8")  # x, y, z only in val/test
    dm = make_dm(path, tmp_path)
    assert dm.vocab == ["<unk>", "a", "b", "c"]
    assert (np.asarray(dm.split_ids("test")) == 0).any()
    assert encode("abz", dm.vocab).tolist() == [1, 2, 0]
    model = CharLanguageModel(vocab=dm.vocab, embedding_dim=4, network=NetworkConfig(hidden_size=8, num_layers=1))
    x, y, _ = next(iter(StreamBatches(dm.split_ids("test"), 2, 8)))
    logits, _ = model(x)
    assert torch.isfinite(torch.nn.functional.cross_entropy(logits.reshape(-1, 4), y.reshape(-1)))
    sample = generate_text(model, "zab", length=30, seed=0)
    assert sample.startswith("zab") and set(sample[3:]) <= set("abc")  # <unk> is never sampled


def test_stream_batches_continue_each_stream():
    ids = np.arange(1000) % 97
    batches = list(StreamBatches(ids, batch_size=4, bptt=10))
    assert len(batches) == len(StreamBatches(ids, batch_size=4, bptt=10))
    assert [reset for *_, reset in batches] == [True] + [False] * (len(batches) - 1)
    for (x0, y0, _), (x1, _, _) in zip(batches, batches[1:]):
        torch.testing.assert_close(x0[:, 1:], y0[:, :-1])
        torch.testing.assert_close(x1[:, 0], y0[:, -1])  # the next batch continues the stream
    # DDP: two ranks read disjoint streams
    r0, r1 = StreamBatches(ids, 2, 10, rank=0, world_size=2), StreamBatches(ids, 2, 10, rank=1, world_size=2)
    np.testing.assert_array_equal(np.concatenate([r0.streams, r1.streams]), StreamBatches(ids, 4, 10).streams)


def test_tbptt_carries_the_detached_state_between_batches():
    torch.manual_seed(0)
    model = CharLanguageModel(vocab=["<unk>", *"abcdefg"], embedding_dim=4, network=NetworkConfig(hidden_size=8, num_layers=2))
    model.log = lambda *args, **kwargs: None  # no Trainer here
    ids = np.random.default_rng(0).integers(1, 8, size=400)
    batches = list(StreamBatches(ids, batch_size=3, bptt=12))
    states = []
    for batch in batches[:3]:
        model.training_step(batch, 0)
        states.append(model._carried["train"])
    for h in states[-1]:
        assert not h.requires_grad
    # the state after batch k+1 equals running batch k+1 from the state after batch k ...
    with torch.no_grad():
        _, expected = model(batches[2][0], states[1])
    torch.testing.assert_close(states[2][0], expected[0])
    # ... and equals running batches 0..2 in one go from zeros
    with torch.no_grad():
        _, whole = model(torch.cat([b[0] for b in batches[:3]], 1))
    torch.testing.assert_close(states[2][1], whole[1])
    # a new epoch starts from zeros: its first batch carries reset=True
    assert batches[0][2] and not any(reset for *_, reset in batches[1:])
    model.training_step(batches[0], 0)
    with torch.no_grad():
        _, fresh = model(batches[0][0])
    torch.testing.assert_close(model._carried["train"][0], fresh[0])


def test_random_windows_are_seeded_per_epoch():
    ids = np.arange(5000) % 50
    epoch = [0]
    windows = RandomWindows(ids, batch_size=4, bptt=8, num_batches=3, seed=1, epoch=lambda: epoch[0])
    first = list(windows)
    epoch[0] = 1
    second = list(windows)
    assert all(reset for *_, reset in first)
    assert not torch.equal(first[0][0], second[0][0])  # another epoch, other windows
    torch.testing.assert_close(list(RandomWindows(ids, 4, 8, 3, seed=1))[0][0], first[0][0])  # (seed, 0) again
    resumed = RandomWindows(ids, 4, 8, 3, seed=1, epoch=lambda: 1)
    resumed.load_state_dict({"next_batch": 2})  # a resume inside epoch 1 goes on with its third batch
    (third,) = list(resumed)
    torch.testing.assert_close(third[0], second[2][0])


def test_sampling_is_reproducible_with_a_seed():
    torch.manual_seed(0)
    model = CharLanguageModel(vocab=build_vocab("abcdefgh \n"), embedding_dim=8, network=NetworkConfig(hidden_size=16, num_layers=1))
    a = generate_text(model, "ab", length=50, temperature=1.0, seed=7)
    assert a == generate_text(model, "ab", length=50, temperature=1.0, seed=7)
    assert a != generate_text(model, "ab", length=50, temperature=1.0, seed=8)
    assert len(a) == 52
    top1 = generate_text(model, "ab", length=20, top_k=1, seed=1)
    assert top1 == generate_text(model, "ab", length=20, top_k=1, seed=2)  # top_k=1 is greedy
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        generate_text(model, "ab", temperature=0)


# ---- bad input ----------------------------------------------------------------------------
def bad_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 50)
    (tmp_path / "short.txt").write_text("To be.\n")
    return {
        "missing.txt": "does not exist",
        "empty.txt": "is empty",
        "binary.bin": "looks binary",
        "latin1.txt": "is not UTF-8 (byte 0xe9 at offset 3)",
    }


def test_bad_text_files_give_one_line_errors(tmp_path):
    for name, message in bad_files(tmp_path).items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            CharTextDataModule(path=str(tmp_path / name), cache_dir=str(tmp_path / "c")).prepare()
    dm = CharTextDataModule(path=str(tmp_path / "short.txt"), batch_size=32, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="shorter than one batch"):
        dm.setup("fit")


@pytest.mark.parametrize("args,message", [
    (["--data.init_args.bptt=0"], "data.bptt must be an integer >= 1, got 0"),
    (["--data.init_args.path=nowhere.txt"], "data.path nowhere.txt does not exist"),
    (["--data.init_args.batching=shuffle"], "data.batching must be one of ['stream', 'random']"),
])
def test_text_cli_errors_are_one_line(args, message, in_tmp_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "shakespeare_lstm.yaml"), *args])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors


# ---- end to end ---------------------------------------------------------------------------
def run_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", HF_DATASETS_CACHE=str(cwd / "hf_datasets"))
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_cli_fit_then_sample_and_vocab_mismatch(text_file, tmp_path):
    tiny = ["--config", str(ROOT / "configs" / "shakespeare_rnn.yaml"), f"--data.init_args.path={text_file}",
            "--data.init_args.batch_size=4", "--data.init_args.bptt=32", "--data.init_args.eval_batch_size=4",
            f"--data.init_args.cache_dir={tmp_path / 'cache'}", "--model.init_args.network.hidden_size=16",
            "--model.init_args.embedding_dim=8"]
    fit = run_cli("fit", *tiny, "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "--- samples at epoch 0" in fit.stdout
    (run_dir,) = (tmp_path / "runs" / "seqmodels").iterdir()
    assert (run_dir / "samples.txt").read_text().count("--- samples at epoch 0") == 1
    (table,) = (tmp_path / "runs" / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"] == ["epoch", "step", "prime", "sample"] and len(logged["data"]) == 2
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["vocab"][0] == "<unk>"

    sample_args = ["sample", *tiny, f"--ckpt_path={ckpt}", "--prime=ROMEO:", "--length=80",
                   "--temperature=0.8", "--top_k=0", "--seed=1"]
    first, second = run_cli(*sample_args, cwd=tmp_path), run_cli(*sample_args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout == second.stdout and first.stdout.startswith("ROMEO:")
    assert len(first.stdout.rstrip("\n")) >= len("ROMEO:") + 70

    other = tmp_path / "other.txt"
    other.write_text("Zebras quietly vex jumping fowl. " * 100)
    for subcommand in (["sample"], ["fit", "--trainer.max_epochs=2"]):
        mismatch = run_cli(*subcommand, *tiny, f"--data.init_args.path={other}", f"--ckpt_path={ckpt}", cwd=tmp_path)
        assert mismatch.returncode == 2, mismatch.stderr[-2000:]
        assert "error: vocabulary mismatch" in mismatch.stderr and "only in the data" in mismatch.stderr
    bad_temperature = run_cli("sample", *tiny, f"--ckpt_path={ckpt}", "--temperature=0", cwd=tmp_path)
    assert bad_temperature.returncode == 2 and "error: temperature must be > 0" in bad_temperature.stderr


def test_predict_writes_next_character_probabilities_that_match_the_test_loss(tmp_path):
    """predict: every test character's most likely successor, its probability and the true
    successor's, in predictions.npz; −mean log p(true) is the test loss (same streams, same
    carried state)."""
    from lightning.pytorch import Trainer

    from seqmodels.callbacks import PredictionFiles

    (tmp_path / "t.txt").write_text("the cat sat on the mat, the dog ran to the park.\n" * 60)
    dm = CharTextDataModule(path=str(tmp_path / "t.txt"), batch_size=4, eval_batch_size=3, bptt=10,
                            cache_dir=str(tmp_path / "cache"))
    dm.prepare()
    torch.manual_seed(0)
    model = CharLanguageModel(vocab=dm.vocab, embedding_dim=4, network=NetworkConfig(hidden_size=8))
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[PredictionFiles()], default_root_dir=str(tmp_path))
    test_loss = float(trainer.test(model, dm, verbose=False)[0]["test/loss"])
    trainer.predict(model, dm, return_predictions=False)
    saved = np.load(tmp_path / "predictions.npz")
    assert list(saved["vocab"]) == dm.vocab
    n = len(saved["target"])
    assert n == len(saved["input"]) == len(saved["predicted"]) and n > 0.9 * len(dm.split_ids("test"))
    assert ((saved["p_predicted"] >= saved["p_target"] - 1e-6) & (saved["p_target"] > 0)).all()
    assert abs(-np.log(saved["p_target"]).mean() - test_loss) < 1e-4 * test_loss
