"""The CLI as a user runs it: fit twice in one folder, then test from the checkpoint."""
from __future__ import annotations

import pytest

import os
import subprocess
import sys

import yaml

from tests.conftest import ROOT, fresh_user_env

TINY = ["--trainer.max_epochs=2", "--data.init_args.train_size=256", "--data.init_args.val_size=64",
        "--data.init_args.test_size=32", "--data.init_args.test_lengths=[5, 40]",
        "--model.init_args.network.hidden_size=8", "--trainer.enable_progress_bar=false"]


def run_cli(*args: str, cwd, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_fit_twice_then_test_with_wandb_offline_and_no_key(tmp_path):
    env = fresh_user_env(tmp_path)
    config = str(ROOT / "configs" / "sums_rnn.yaml")

    runs = [run_cli("fit", "--config", config, *TINY, cwd=tmp_path, env=env) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
        notices = [l for l in run.stderr.splitlines() if l.startswith("W&B:")]
        assert len(notices) == 1 and "no API key" in notices[0] and "wandb sync" in notices[0]

    offline_runs = sorted((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2
    run_dirs = sorted(p for p in (tmp_path / "runs" / "seqmodels").iterdir())
    assert len(run_dirs) == 2, "each run gets its own directory"
    for run_dir in run_dirs:
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        assert list((run_dir / "checkpoints").glob("best-*.ckpt"))
        saved = yaml.safe_load((run_dir / "cli_config.yaml").read_text())
        assert saved["model"]["init_args"]["network"]["hidden_size"] == 8 and saved["seed_everything"] == 1234

    best = next((run_dirs[0] / "checkpoints").glob("best-*.ckpt"))
    tested = run_cli("test", "--config", config, *TINY, f"--ckpt_path={best}", cwd=tmp_path, env=env)
    assert tested.returncode == 0, tested.stderr[-3000:]
    for name in ("test/mse_len_5", "test/mse_len_40", "test/mae_len_5", "test/mae_len_40"):
        assert name in tested.stdout, tested.stdout[-3000:]


@pytest.mark.slow
def test_print_config_shows_the_resolved_config(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = run_cli("fit", "--config", str(ROOT / "configs" / "sums_lstm.yaml"), "--print_config",
                  cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    config = yaml.safe_load(out.stdout)
    assert config["model"]["class_path"] == "seqmodels.tasks.SumsRegressor"
    assert config["trainer"]["gradient_clip_val"] == 1.0
    assert config["trainer"]["gradient_clip_algorithm"] == "norm"
    assert config["optimizer"]["class_path"] == "torch.optim.Adam"
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_config_is_logged_once_and_flat(in_tmp_dir):
    """With a CSVLogger, hparams.yaml holds the resolved CLI config, flat, and nothing else
    (the modules' own hyperparameters are not logged a second time)."""
    from seqmodels.cli import main

    main(["fit", "--config", str(ROOT / "configs" / "sums_lstm.yaml"), *TINY,
          "--trainer.max_epochs=1", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
          "--trainer.logger.save_dir=runs"])
    hparams_files = list((in_tmp_dir / "runs").rglob("hparams.yaml"))
    assert len(hparams_files) == 1
    logged = yaml.safe_load(hparams_files[0].read_text())
    assert logged["model.hidden_size"] == 8 and logged["model.class_path"] == "seqmodels.tasks.SumsRegressor"
    assert not [key for key in logged if "init_args" in key or "." not in key and key != "seed_everything"
                and key not in ("ckpt_path", "weights_only")], sorted(logged)
    run_dir = hparams_files[0].parent
    assert (run_dir / "cli_config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_the_first_screen_has_no_third_party_notes(tmp_path):
    """A fit's console: the project's lines, W&B's, the summary, the progress; the known
    third-party tips and deprecation notes stay filtered (by their message)."""
    import subprocess
    import sys

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 100)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(ROOT), WANDB_MODE="offline", PYTHONWARNINGS="default")
    run = subprocess.run([sys.executable, str(ROOT / "cli.py"), "fit", "--config",
                          str(ROOT / "configs" / "shakespeare_lstm.yaml"), f"--data.init_args.path={corpus}",
                          f"--data.init_args.cache_dir={tmp_path / 'cache'}", "--data.init_args.batch_size=4",
                          "--data.init_args.eval_batch_size=4", "--data.init_args.bptt=16", "--trainer.max_steps=2",
                          "--model.init_args.network.hidden_size=8", "--trainer.precision=bf16-mixed"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    screen = run.stdout + run.stderr
    for note in ("litlogger", "LeafSpec", "IterableDataset", "not supported by the model summary", "anonymous"):
        assert note not in screen, note
    assert not [line for line in screen.splitlines() if line.startswith("wandb:")], "offline: our one line only"
    assert "Trainable params" in screen and "wandb sync" in screen  # what the user does see
