"""W&B as its users expect it, checked offline by reading back the run's own file: a readable
name, tags and a group, the config flat and once, the best validation loss in the summary,
gradient histograms through ``WandbLogger.watch``, checkpoints as artifacts with
``log_model``, and, with no API key, one line on the console with the sync command."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from seqmodels.tracking import describe_run, flat_config
from tests.conftest import ROOT, fresh_user_env
from tests.helpers.wandb_files import OfflineRun

SUMS = str(ROOT / "configs" / "sums_lstm.yaml")
TINY = ["--trainer.max_epochs=2", "--data.init_args.train_size=256", "--data.init_args.val_size=64",
        "--data.init_args.test_size=32", "--data.init_args.test_lengths=[5, 40]", "--data.init_args.batch_size=8",
        "--model.init_args.network.hidden_size=8", "--trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def offline_fit(tmp_path_factory):
    """One fit of the sums LSTM as a user without a W&B key runs it (64 steps, gradient
    histograms every 50, every checkpoint as an artifact)."""
    tmp_path = tmp_path_factory.mktemp("wandb")
    env = fresh_user_env(tmp_path)
    run = subprocess.run([sys.executable, str(ROOT / "cli.py"), "fit", "--config", SUMS, *TINY,
                          "--trainer.logger.init_args.log_model=all"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    folders = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(folders) == 1
    return run, OfflineRun(folders[0]), folders[0].relative_to(tmp_path)


@pytest.mark.slow
def test_offline_without_a_key_is_one_line_with_the_sync_command(offline_fit):
    run, _, folder = offline_fit
    console = (run.stdout + run.stderr).splitlines()
    ours = [line for line in console if line.startswith("W&B:")]
    assert len(ours) == 1 and f"wandb sync {folder}" in ours[0] and "no API key" in ours[0], ours
    assert not [line for line in console if line.startswith("wandb:")], "wandb's own lines are silenced offline"
    assert "anonymous" not in run.stderr


@pytest.mark.slow
def test_run_name_tags_and_group_say_what_ran(offline_fit):
    _, logged, _ = offline_fit
    assert logged.run.display_name == "sums-lstm-1x8"
    assert set(logged.run.tags) == {"task:sums", "cell:lstm", "impl:auto", "data:sums"}
    assert logged.run.run_group == "sums_lstm"


@pytest.mark.slow
def test_config_is_flat_and_logged_once(offline_fit):
    _, logged, _ = offline_fit
    config = logged.config
    assert config["model.hidden_size"] == 8 and config["model.cell"] == "lstm"
    assert config["optimizer.lr"] == 0.005 and config["optimizer.class_path"] == "torch.optim.Adam"
    assert config["data.batch_size"] == 8 and config["trainer.max_epochs"] == 2
    assert "GradientDistribution" in config["trainer.callbacks"]
    assert not [k for k in config if "init_args" in k or k.startswith("cli_config") or k.startswith("trainer.logger")]
    assert logged.config_updates["model.hidden_size"] == 1, "the config is logged once"


@pytest.mark.slow
def test_summary_keeps_the_best_validation_loss(offline_fit):
    _, logged, _ = offline_fit
    defined = {m.name: m.summary for m in logged.metrics if m.name}
    assert defined["val/loss"].min and defined["val/loss"].last
    history = [row["val/loss"] for row in logged.history if "val/loss" in row]
    assert len(history) == 2
    assert math.isclose(logged.summary["val/loss"]["min"], min(history))
    assert math.isclose(logged.summary["val/loss"]["last"], history[-1])


@pytest.mark.slow
def test_gradient_histograms_come_from_watch_and_checkpoints_are_artifacts(offline_fit):
    _, logged, _ = offline_fit
    histograms = {k.removesuffix("/_type") for row in logged.history for k, v in row.items()  # nested keys come flat
                  if k.startswith("gradients/") and k.endswith("/_type") and v == "histogram"}
    assert "gradients/stack.weight_hh_l0" in histograms, sorted(histograms)
    models = [a for a in logged.artifacts if a.type == "model"]
    assert models and "best" in {alias for a in models for alias in a.aliases}


@pytest.mark.slow
def test_name_tags_and_group_can_be_overridden(in_tmp_dir):
    from seqmodels.cli import main

    cli = main(["fit", "--config", SUMS, *TINY, "--trainer.max_epochs=1", "--data.init_args.batch_size=64",
                "--trainer.logger.init_args.name=my-run", "--trainer.logger.init_args.tags=[mine]",
                "--trainer.logger.init_args.group=sweep-3"])
    run = cli.trainer.logger.experiment
    assert (run.name, list(run.tags), run.group) == ("my-run", ["mine"], "sweep-3")


def test_describe_run_for_each_task():
    text = describe_run({"class_path": "seqmodels.tasks.CharLanguageModel",
                         "init_args": {"network": {"cell": "lstm", "hidden_size": 256, "num_layers": 2}}},
                        {"class_path": "data_modules.text.CharTextDataModule", "init_args": {"path": None}},
                        ["configs/shakespeare_lstm.yaml"])
    assert text == {"name": "char-lm-lstm-2x256", "group": "shakespeare_lstm",
                    "tags": ["task:char-lm", "cell:lstm", "impl:auto", "data:shakespeare"]}
    music = describe_run({"class_path": "seqmodels.tasks.PolyphonicMusicModel",
                          "init_args": {"network": {"cell": "gru", "hidden_size": 256, "impl": "reference"}}},
                         {"class_path": "data_modules.ChoralesDataModule",
                          "init_args": {"path": "/data/JSB_Chorales.mat"}}, [])
    assert music == {"name": "music-gru-1x256", "group": "music",
                     "tags": ["task:music", "cell:gru", "impl:reference", "data:JSB_Chorales"]}
    assert describe_run({"class_path": "seqmodels.tasks.PolyphonicMusicModel", "init_args": {}},
                        {"class_path": "data_modules.ChoralesDataModule", "init_args": {}},
                        [])["tags"][-1] == "data:bach-chorales"
    peephole = describe_run({"class_path": "seqmodels.tasks.SumsRegressor",
                             "init_args": {"network": {"cell": "lstm", "peephole": True, "hidden_size": 4}}},
                            {"class_path": "data_modules.SumsDataModule", "init_args": {}}, ["a/sums_lstm.yaml"])
    assert peephole["name"] == "sums-lstm-peephole-1x4"
    hub = describe_run({"class_path": "seqmodels.tasks.CharLanguageModel", "init_args": {}},
                       {"class_path": "data_modules.text.CharTextDataModule",
                        "init_args": {"path": ["https://example.org/a.txt", "b.txt"]}}, [])
    assert hub["tags"][-1] == "data:a+1"


def test_flat_config_folds_classes_and_lifts_the_network():
    flat = flat_config({"seed_everything": 1, "config": ["x.yaml"],
                        "trainer": {"max_epochs": 3, "logger": {"class_path": "W", "init_args": {"project": "p"}},
                                    "callbacks": [{"class_path": "a.B", "init_args": {}}, {"class_path": "c.D"}]},
                        "model": {"class_path": "m.M", "init_args": {"embedding_dim": 8,
                                                                     "network": {"hidden_size": 4, "cell": "gru"}}},
                        "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.1}}})
    assert flat == {"seed_everything": 1, "trainer.max_epochs": 3, "trainer.callbacks": ["B", "D"],
                    "model.class_path": "m.M", "model.embedding_dim": 8, "model.hidden_size": 4,
                    "model.cell": "gru", "optimizer.class_path": "torch.optim.Adam", "optimizer.lr": 0.1}
