"""PolyphonicMusicModel: the published NLL whatever the batching, accuracy, generation,
MIDI/PNG writing, the piano-roll callback, and the CLI end to end (fit, then sample)."""
from __future__ import annotations

import importlib.util
import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_modules.chorales import ChoralesDataModule, RollDataset, pad_rolls
from data_modules.midi_folder import midi_to_roll
from seqmodels.errors import ConfigError
from seqmodels.music import (FrameAccuracy, FrameNLL, plot_roll, roll_to_notes, rru_windows, windowed_nll,
                             write_midi)
from seqmodels.sampling import generate_roll, sample
from seqmodels.tasks import NetworkConfig, PolyphonicMusicModel
from tests.conftest import ROOT
from tests.test_chorales_data import write_mat, write_pickle


def random_rolls(n: int, seed: int = 0, low: int = 2, high: int = 30) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random((int(rng.integers(low, high)), 88)) < 0.05).astype(np.uint8) for _ in range(n)]


def metrics_over(model, rolls, batch_size, pack=False):
    model.eval()
    model.pack = pack
    nll, acc = FrameNLL(), FrameAccuracy()
    loader = torch.utils.data.DataLoader(RollDataset(rolls), batch_size=batch_size, collate_fn=pad_rolls)
    with torch.no_grad():
        for batch in loader:
            _, logits, targets, mask = model._step(batch)
            nll.update(logits, targets, mask)
            acc.update(logits, targets, mask)
    return float(nll.compute()), float(acc.compute())


@pytest.mark.parametrize("cell,impl", [("lstm", "native"), ("lstm", "autograd"), ("rnn", "bptt")])
def test_nll_is_the_published_definition_whatever_the_batching(cell, impl):
    torch.manual_seed(0)
    model = PolyphonicMusicModel(network=NetworkConfig(cell=cell, hidden_size=16, impl=impl))
    rolls = random_rolls(13)
    # by hand: Σ over sequences of the summed BCE of frames 2..T, over Σ (T_i - 1)
    total, frames = 0.0, 0
    with torch.no_grad():
        for r in rolls:
            x = torch.from_numpy(r).float().unsqueeze(0)
            logits, _ = model(x[:, :-1])
            total += F.binary_cross_entropy_with_logits(logits.double(), x[:, 1:].double(),
                                                        reduction="sum").item()
            frames += len(r) - 1
    expected = total / frames
    results = [metrics_over(model, rolls, bs, pack) for bs in (1, 4, 13) for pack in (False, True)]
    for nll, acc in results:
        assert nll == pytest.approx(expected, rel=1e-5)
        assert acc == pytest.approx(results[0][1], abs=1e-7)


def test_nll_is_not_a_mean_of_per_sequence_means():
    torch.manual_seed(0)
    model = PolyphonicMusicModel(network=NetworkConfig(hidden_size=8))
    rolls = [random_rolls(1, seed=1, low=40, high=41)[0], random_rolls(1, seed=2, low=2, high=3)[0]]
    nll, _ = metrics_over(model, rolls, batch_size=2)
    per_seq = [metrics_over(model, [r], batch_size=1)[0] for r in rolls]
    frames = [len(r) - 1 for r in rolls]
    assert nll == pytest.approx(np.average(per_seq, weights=frames), rel=1e-5)
    assert abs(nll - np.mean(per_seq)) > 1e-3


def rru_split(length: int, window: int) -> list[tuple[int, int]]:
    """LUMII-Syslab/RRU's mm_utils.split_data_in_parts (step = window, min_length 1), transcribed
    on frame indices: (first input frame, number of frames predicted)."""
    parts, last_index = [], 0
    for i in range(0, length - window, window):
        parts.append((i, window))
        last_index = i + window
    remaining_length = length - last_index
    if remaining_length >= 1 + 1:
        parts.append((last_index, remaining_length - 1))
    return parts


def test_rru_windows_are_the_papers_split_and_predict_every_frame_once():
    for window in (1, 2, 7, 200):
        for length in range(0, 3 * window + 3):
            spans = rru_windows(length, window)
            assert [(a, b - a) for a, b in spans] == rru_split(length, window)
            targets = [t for a, b in spans for t in range(a + 1, b + 1)]
            assert targets == list(range(1, length))
            assert all(b - a <= window for a, b in spans)


def test_windowed_nll_is_the_papers_mean_of_window_means_from_the_zero_state():
    torch.manual_seed(0)
    model = PolyphonicMusicModel(network=NetworkConfig(hidden_size=8)).eval()
    rolls = random_rolls(5, seed=3, low=2, high=30)
    window, batch = 7, 3
    # by hand: every window alone, from the zero state; batches of 3 in order, the last one
    # taking the leftovers; the mean of the batches' means of the windows' means
    means = []
    with torch.no_grad():
        for r in rolls:
            for a, b in rru_windows(len(r), window):
                x = torch.from_numpy(r[a : b + 1]).float().unsqueeze(0)
                logits, _ = model(x[:, :-1])
                means.append(F.binary_cross_entropy_with_logits(
                    logits.double(), x[:, 1:].double(), reduction="none").sum(-1).mean().item())
    n = len(means) // batch
    groups = [means[i * batch:(i + 1) * batch] for i in range(n - 1)] + [means[(n - 1) * batch:]]
    assert len(groups[-1]) > batch  # the leftovers are in the last batch
    expected = float(np.mean([np.mean(g) for g in groups]))
    assert windowed_nll(model, rolls, window, batch) == pytest.approx(expected, rel=1e-9)
    # the state is reset at each window: a window as long as the longest piece gives another number
    full = windowed_nll(model, rolls, window=100, batch_size=batch)
    assert abs(full - expected) > 1e-4
    # fewer windows than a batch: one batch
    assert windowed_nll(model, rolls[:1], window=100, batch_size=16) == pytest.approx(
        metrics_over(model, rolls[:1], batch_size=1)[0], rel=1e-5)
    with pytest.raises(ValueError, match="nothing to predict"):
        windowed_nll(model, [np.zeros((1, 88), np.uint8)])


def test_frame_accuracy_counts_tp_fp_fn_over_all_frames():
    acc = FrameAccuracy()
    target = torch.zeros(1, 2, 88)
    target[0, 0, [0, 1]] = 1
    target[0, 1, [2]] = 1
    logits = torch.full((1, 2, 88), -5.0)
    logits[0, 0, [0, 5]] = 5   # TP 1, FP 1, FN 1 (pitch 1)
    logits[0, 1, [2]] = 5      # TP 1
    acc.update(logits, target, torch.ones(1, 2, dtype=torch.bool))
    padded = torch.ones(1, 1, 88) * 5  # masked out: counts nothing
    acc.update(padded, torch.zeros(1, 1, 88), torch.zeros(1, 1, dtype=torch.bool))
    assert float(acc.compute()) == pytest.approx(2 / 4)


def test_training_loss_is_the_nll_of_the_batch_and_masks_padding():
    torch.manual_seed(0)
    model = PolyphonicMusicModel(network=NetworkConfig(hidden_size=8))
    rolls = random_rolls(3, seed=5)
    batch = pad_rolls([torch.from_numpy(r).float() for r in rolls])
    model.eval()
    loss, *_ = model._step(batch)
    assert loss.item() == pytest.approx(metrics_over(model, rolls, 3)[0], rel=1e-5)
    x, lengths = batch
    noisy = x.clone()
    for i, n in enumerate(lengths):
        noisy[i, n:] = 1.0  # garbage in the padding changes nothing
    assert model._step((noisy, lengths))[0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_bad_model_settings():
    with pytest.raises(ConfigError, match="model.input_dropout must be in"):
        PolyphonicMusicModel(input_dropout=1.0)
    with pytest.raises(ConfigError, match="model.network.hidden_size"):
        PolyphonicMusicModel(network=NetworkConfig(hidden_size=0))
    with pytest.raises(ConfigError, match="model.network.recurrent_init must be one of"):
        PolyphonicMusicModel(network=NetworkConfig(recurrent_init="zeros"))


def test_recurrent_init_reaches_the_music_model():
    """Like every task: ``recurrent_init: orthogonal`` makes each W_hh gate block orthogonal × gain."""
    model = PolyphonicMusicModel(network=NetworkConfig(cell="lstm", hidden_size=16, recurrent_init="orthogonal", recurrent_gain=0.5))
    for block in model.stack.layers[0].cell.weight_hh.detach().split(16, dim=0):
        torch.testing.assert_close(block @ block.T, 0.25 * torch.eye(16), atol=1e-5, rtol=0)


# ---- generation ---------------------------------------------------------------------------
def test_generate_is_seeded_primed_and_respects_top_k():
    torch.manual_seed(0)
    model = PolyphonicMusicModel(network=NetworkConfig(hidden_size=8))
    torch.nn.init.constant_(model.head.bias, 0.0)  # p = 0.5 everywhere: plenty of notes
    a = generate_roll(model, 20, seed=7)
    b = generate_roll(model, 20, seed=7)
    c = generate_roll(model, 20, seed=8)
    assert a.shape == (20, 88) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    prime = random_rolls(1, seed=3, low=6, high=7)[0]
    primed = generate_roll(model, 10, prime, seed=1)
    assert primed.shape == (16, 88)
    np.testing.assert_array_equal(primed[:6], prime)
    top = generate_roll(model, 30, seed=2, top_k=3)
    assert top[1:].sum(1).max() <= 3
    with torch.no_grad():
        model.head.weight.mul_(0.01)
        model.head.bias.fill_(-0.5)
        model.head.bias[[39, 43, 46]] = 0.5
    for seed in (1, 2):  # temperature -> 0: each pitch on iff p > 0.5
        cold = generate_roll(model, 30, prime[:1], seed=seed, temperature=1e-3)
        assert (cold[1:].sum(0) > 0).nonzero()[0].tolist() == [39, 43, 46] and cold[1:].sum() == 30 * 3
    hot = generate_roll(model, 30, prime[:1], seed=1, temperature=100.0)
    assert 0.3 < hot[1:].mean() < 0.7  # temperature -> inf: every pitch a fair coin
    state = torch.get_rng_state()
    generate_roll(model, 5, seed=1)
    assert torch.equal(state, torch.get_rng_state()), "generation must not touch the global RNG"


def test_openings_seen_in_training_start_generation_from_scratch():
    model = PolyphonicMusicModel(network=NetworkConfig(hidden_size=8))
    chord = torch.zeros(2, 88)
    chord[:, [39, 43, 46]] = 1  # C major
    model._remember_openings(chord)
    assert int(model.n_openings) == 2
    roll = generate_roll(model, 5, seed=0)
    assert sorted(np.flatnonzero(roll[0])) == [39, 43, 46]
    restored = PolyphonicMusicModel(network=NetworkConfig(hidden_size=8))
    restored.load_state_dict(model.state_dict())
    assert int(restored.n_openings) == 2


def test_midi_round_trip_and_png(tmp_path):
    roll = np.zeros((8, 88), dtype=np.uint8)
    roll[0:4, 60 - 21] = 1          # C4 held 4 steps
    roll[0:2, 64 - 21] = 1
    roll[2:4, 65 - 21] = 1
    roll[5, [48 - 21, 55 - 21]] = 1  # after a silent step
    roll[6:8, 48 - 21] = 1
    assert (60, 0, 4) in roll_to_notes(roll) and (48, 5, 3) in roll_to_notes(roll)
    midi = write_midi(roll, tmp_path / "x.mid")
    assert midi.read_bytes()[:4] == b"MThd"
    np.testing.assert_array_equal(midi_to_roll(midi), roll)  # every step, to the last
    back2 = midi_to_roll(write_midi(roll, tmp_path / "y.mid", steps_per_quarter=2), steps_per_quarter=2)
    np.testing.assert_array_equal(back2, roll)
    png = plot_roll(roll, tmp_path / "x.png", title="test", prime_frames=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_writes_midi_and_png_and_reports(tmp_path):
    torch.manual_seed(0)
    model = PolyphonicMusicModel(network=NetworkConfig(hidden_size=8))
    dm = ChoralesDataModule(path=str(write_mat(tmp_path / "songs.mat")))
    text = sample(model, dm, prime=None, prime_frames=3, length=12, temperature=1.0, top_k=0, seed=4,
                        output=str(tmp_path / "out"))
    assert "15 frames (3 primed + 12 generated)" in text and "test sequence" in text
    assert (tmp_path / "out" / "sample-seed4-prime3.mid").is_file()
    assert (tmp_path / "out" / "sample-seed4-prime3.png").is_file()
    with pytest.raises(ConfigError, match="longer than every test sequence"):
        sample(model, dm, prime=None, prime_frames=50, length=5, temperature=1.0, top_k=0, seed=0,
                     output=str(tmp_path))
    with pytest.raises(ConfigError, match="prime_frames"):
        sample(model, dm, prime="ROMEO:", prime_frames=0, length=5, temperature=1.0, top_k=0, seed=0,
                     output=str(tmp_path))


# ---- the CLI end to end ----------------------------------------------------------------------
TINY = ["--model.init_args.network.hidden_size=8", "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false",
        "--trainer.max_time=null", "--data.init_args.batch_size=2",
        "--trainer.callbacks+=seqmodels.callbacks.PianoRollSamples",
        "--trainer.callbacks.length=12", "--trainer.callbacks.every_n_epochs=1"]


@pytest.mark.slow
def test_cli_fit_then_sample_on_a_tiny_file(in_tmp_dir, capsys):
    from seqmodels.cli import main

    songs = {s: [[tuple(60 + (t + k) % 5 for k in range(3)) for t in range(6 + i)] for i in range(n)]
             for s, n in (("train", 4), ("valid", 2), ("test", 2))}
    data = write_pickle(in_tmp_dir / "tiny.pickle", songs)
    config = str(ROOT / "configs" / "jsb_lstm.yaml")
    cli = main(["fit", "--config", config, f"--data.path={data}", *TINY])
    metrics = cli.trainer.callback_metrics
    for name in ("train/loss", "val/loss", "val/nll", "val/acc"):
        assert name in metrics and math.isfinite(float(metrics[name]))
    run = Path(cli.trainer.checkpoint_callback.best_model_path).parents[1]
    assert sorted(p.name for p in (run / "samples").iterdir())[-1] == "epoch001.png"
    media = list((in_tmp_dir / "runs" / "wandb").rglob("media/images/samples/piano_roll*.png"))
    assert media, "the piano roll is logged to W&B"

    import wandb

    wandb.finish()
    capsys.readouterr()
    main(["sample", "--config", config, f"--data.path={data}", "--model.init_args.network.hidden_size=8",
          "--ckpt_path=last", "--prime_frames=2", "--length=10",  # last: the newest run's last.ckpt
          "--seed=5", "--output=out"])
    printed = capsys.readouterr().out
    assert "12 frames (2 primed + 10 generated)" in printed and "MIDI: out/sample-seed5-prime2.mid" in printed
    assert (in_tmp_dir / "out" / "sample-seed5-prime2.mid").is_file()
    assert (in_tmp_dir / "out" / "sample-seed5-prime2.png").is_file()

    cli = main(["test", "--config", config, f"--data.path={data}", "--model.init_args.network.hidden_size=8",
                "--trainer.enable_progress_bar=false",
                f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    assert "test/nll" in cli.trainer.callback_metrics and "test/acc" in cli.trainer.callback_metrics
    nll = float(cli.trainer.callback_metrics["test/nll"])

    # predict: p(pitch on) for every predicted frame of every test sequence, to a file
    capsys.readouterr()
    main(["predict", "--config", config, f"--data.path={data}", "--model.init_args.network.hidden_size=8",
          "--trainer.enable_progress_bar=false", "--ckpt_path=last"])
    assert "predictions.npz" in capsys.readouterr().out
    saved = np.load(run / "predictions.npz")
    tests = [r for r in ChoralesDataModule(path=str(data), cache_dir=str(in_tmp_dir / "c"), progress=False).load()["test"]]
    probs = [saved[f"frame_probs_{i}"] for i in range(len(tests))]
    assert sorted(len(p) for p in probs) == sorted(len(r) - 1 for r in tests)
    assert all(p.shape[1] == 88 and ((p > 0) & (p < 1)).all() for p in probs)
    frames = [saved[f"frames_{i}"] for i in range(len(tests))]
    # the published NLL from the predicted probabilities equals what `test` reported
    bce = sum(-(f * np.log(p) + (1 - f) * np.log(1 - p)).sum() for p, f in zip(probs, frames))
    assert abs(bce / sum(len(p) for p in probs) - nll) < 1e-3 * nll


@pytest.mark.slow
def test_the_rru_config_trains_on_windows_of_a_tiny_file(in_tmp_dir):
    from seqmodels.cli import main

    songs = {s: [[tuple(60 + (t + k) % 5 for k in range(3)) for t in range(9 + i)] for i in range(n)]
             for s, n in (("train", 3), ("valid", 2), ("test", 2))}
    data = write_pickle(in_tmp_dir / "tiny.pickle", songs)
    cli = main(["fit", "--config", str(ROOT / "configs" / "jsb_rru.yaml"), f"--data.path={data}", *TINY[:4],
                "--data.init_args.batch_size=2", "--data.init_args.train_window=4", "--trainer.logger=false"])
    assert cli.model.stack.cell_type == "rru" and cli.model.stack.layers[0].cell.middle_dropout == 0.48
    names = [type(c).__name__ for c in cli.trainer.callbacks]  # the average is in place before the continuation
    assert names.index("EMAWeights") < names.index("ContinuationComparison")
    assert cli.trainer.callbacks[names.index("EMAWeights")].decay == 0.998
    assert [len(r) for r in cli.datamodule.train_set.rolls] == [5, 5, 5, 3, 5, 5, 5, 4, 5, 5, 5, 5, 3]
    assert [len(r) for r in cli.datamodule.val_set.rolls] == [9, 10]
    assert math.isfinite(float(cli.trainer.callback_metrics["val/nll"]))


def test_cli_bad_data_path_is_one_line(in_tmp_dir, capsys):
    from seqmodels.cli import main

    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(ROOT / "configs" / "jsb_lstm.yaml"), "--data.path=missing.mat"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: data.path missing.mat does not exist")


@pytest.mark.slow
def test_at_the_end_of_training_a_continuation_sits_beside_the_real_one(in_tmp_dir):
    """ContinuationComparison (in the JSB and chorales configs): the first 8 frames of a test
    sequence given, the real and the generated continuation as one PNG (logged to W&B), two
    MIDI files (saved to the W&B run) and two WAV files (logged to W&B as audio, or saved to the
    run without soundfile); the generated one starts with the same 8 frames."""
    from seqmodels.cli import main

    songs = {s: [[tuple(60 + (t + k + i) % 7 for k in range(3)) for t in range(30 + i)] for i in range(n)]
             for s, n in (("train", 4), ("valid", 2), ("test", 2))}
    data = write_pickle(in_tmp_dir / "long.pickle", songs)
    cli = main(["fit", "--config", str(ROOT / "configs" / "jsb_lstm.yaml"), f"--data.path={data}", *TINY])
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "ContinuationComparison")
    assert callback.paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    real, generated = midi_to_roll(callback.paths["real"]), midi_to_roll(callback.paths["generated"])
    tests = cli.datamodule.load()["test"]
    assert any(len(t) == len(real) and np.array_equal(t, real) for t in tests), "the real continuation is a test sequence"
    assert np.array_equal(generated[:8], real[:8]), "the model continues the same 8 frames"
    assert list((in_tmp_dir / "runs" / "wandb").rglob("media/images/samples/continuation*.png"))
    for key in ("real", "generated"):
        wav = callback.paths[f"{key}_wav"]
        assert wav.name == f"continuation-{key}.wav" and wav.parent == callback.paths["real"].parent
        with wave.open(str(wav), "rb") as f:
            assert f.getnframes() > 0 and f.getframerate() == callback.sample_rate
    # wandb logs audio only with soundfile installed (not a dependency): else the files are saved to the run
    logged = importlib.util.find_spec("soundfile") is not None
    for key in ("real", "generated"):
        assert bool(list((in_tmp_dir / "runs" / "wandb").rglob(
            f"media/audio/samples/continuation_{key}_audio*.wav"))) == logged, "logged as audio when it can be"
    import wandb

    files = Path(wandb.run.dir)
    wandb.finish()
    assert (files / "samples" / "continuation-generated.mid").is_file()
    assert (files / "samples" / "continuation-generated.wav").is_file() != logged


@pytest.mark.slow
def test_ema_weights_are_the_checkpoint_and_what_test_scores(in_tmp_dir):
    """seqmodels.callbacks.EMAWeights: the checkpoint holds the running average of the weights after
    each optimizer step (recomputed here by hand), and ``test`` with that checkpoint scores the
    average, not the raw weights saved beside it (Lightning's own callback loads the raw ones)."""
    from lightning.pytorch import Callback

    from seqmodels.callbacks import EMAWeights
    from seqmodels.cli import main

    class Steps(Callback):  # the raw weights after every optimizer step
        def __init__(self):
            self.weights = []

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.weights.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    songs = {s: [[tuple(60 + (t + k) % 5 for k in range(3)) for t in range(6 + i)] for i in range(n)]
             for s, n in (("train", 4), ("valid", 2), ("test", 2))}
    data = write_pickle(in_tmp_dir / "tiny.pickle", songs)
    steps, decay = Steps(), 0.6
    cli = main(["fit", "--config", str(ROOT / "configs" / "jsb_gru.yaml"), f"--data.path={data}", *TINY[:4],
                "--data.init_args.batch_size=2", "--trainer.logger=false",  # jsb_gru.yaml has no EMAWeights of its own
                "--trainer.callbacks+=seqmodels.callbacks.EMAWeights", f"--trainer.callbacks.decay={decay}",
                "--trainer.callbacks.update_starting_at_step=1"],
               trainer_defaults={"callbacks": [steps]})
    assert len(steps.weights) == 4  # 2 epochs x 2 batches
    average = dict(steps.weights[1])  # the first update (after step index 1) copies the weights
    for w in steps.weights[2:]:
        average = {k: decay * average[k] + (1 - decay) * w[k] for k in average}
    path = Path(cli.trainer.checkpoint_callback.best_model_path)
    saved = torch.load(path, map_location="cpu", weights_only=False)
    weight = "stack.weight_hh_l0"
    for name, _ in cli.model.named_parameters():
        torch.testing.assert_close(saved["state_dict"][name], average[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(saved["current_model_state"][name], steps.weights[-1][name])
    for name, _ in cli.model.named_buffers():  # the openings seen: the model's, not averaged
        if name in saved["state_dict"]:
            torch.testing.assert_close(saved["state_dict"][name], steps.weights[-1][name], rtol=0, atol=0)
    assert saved["state_dict"]["n_openings"] > 0
    assert not torch.equal(saved["state_dict"][weight], saved["current_model_state"][weight])
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=str(path), verbose=False)
    torch.testing.assert_close(cli.model.state_dict()[weight], average[weight], rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="decay=1.0: give a number between 0 and 1"):
        EMAWeights(decay=1.0)


@pytest.mark.slow  # a fit of 2 epochs: ~15 s
def test_piano_roll_samples_come_from_the_weights_the_validation_scored(in_tmp_dir, monkeypatch):
    """With EMAWeights first in the list (as in jsb_lstm.yaml), Lightning swaps the raw weights back
    before PianoRollSamples runs: the samples must still come from the average, as val/nll does."""
    from lightning.pytorch import Callback

    from seqmodels import callbacks
    from seqmodels.cli import main

    class Validated(Callback):  # the weights in the module while validation scores it, and the raw ones
        def __init__(self):
            self.weights, self.raw = [], {}

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.raw = {k: v.detach().clone() for k, v in pl_module.named_parameters()}

        def on_validation_batch_end(self, trainer, pl_module, *args):
            if not trainer.sanity_checking:
                self.weights.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})

    sampled, real_generate_roll = [], callbacks.generate_roll

    def generate_roll(model, *args, **kwargs):
        sampled.append(({k: v.detach().clone() for k, v in model.named_parameters()}, dict(validated.weights[-1])))
        return real_generate_roll(model, *args, **kwargs)

    monkeypatch.setattr(callbacks, "generate_roll", generate_roll)
    validated = Validated()
    songs = {s: [[tuple(60 + (t + k) % 5 for k in range(3)) for t in range(6 + i)] for i in range(n)]
             for s, n in (("train", 4), ("valid", 1), ("test", 1))}
    data = write_pickle(in_tmp_dir / "tiny.pickle", songs)
    cli = main(["fit", "--config", str(ROOT / "configs" / "jsb_lstm.yaml"), f"--data.path={data}", *TINY,
                "--trainer.logger=false"], trainer_defaults={"callbacks": [validated]})
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert names.index("EMAWeights") < names.index("PianoRollSamples")
    assert len(sampled) == 3  # the config's PianoRollSamples at epoch 0, TINY's at epochs 0 and 1
    for weights, scored in sampled:
        for name in weights:
            torch.testing.assert_close(weights[name], scored[name], rtol=0, atol=0)
    assert not torch.equal(sampled[-1][0]["head.weight"], validated.raw["head.weight"]), "the average, not the raw"
