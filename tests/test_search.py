"""The hyperparameter search (``python -m seqmodels.search``, docs/search.md) on a tiny canonical
music file: trials, resume, pruning, the best config, the plot, the test split never read, and
one line for every kind of bad space file."""
from __future__ import annotations

import math

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_chorales_data import write_pickle
from tests.helpers import mark_slow

optuna = pytest.importorskip("optuna")
pytest.importorskip("optuna_integration")

from optuna.trial import TrialState  # noqa: E402

from seqmodels.search import compose, main, trial_config  # noqa: E402

SONGS = {s: [[tuple(60 + (t + k + i) % 5 for k in range(3)) for t in range(6 + i)] for i in range(n)]
         for s, n in (("train", 4), ("valid", 2), ("test", 2))}
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def write_space(folder, study="tiny", **changes) -> str:
    space = {"study": study, "config": "configs/jsb_lstm.yaml", "metric": "val/nll", "direction": "minimize",
             "seed": 3, "budget": {"trials": 2, "max_epochs": 2},
             "params": {"model.init_args.network.hidden_size": {"type": "int", "low": 4, "high": 12, "step": 4},
                        "optimizer.init_args.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}}}
    space.update(changes)
    path = folder / f"{study}.yaml"
    path.write_text(yaml.safe_dump(space), encoding="utf-8")
    return str(path)


@pytest.fixture
def tiny(in_tmp_dir, monkeypatch):
    """An empty folder with a tiny canonical file, W&B off (a trial is a few seconds)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    write_pickle(in_tmp_dir / "tiny.pickle", SONGS)
    return in_tmp_dir


def run(space: str, *extra: str):
    return main([space, "--data.init_args.path", "tiny.pickle", *QUIET, *extra])


def load(tmp, study="tiny"):
    return optuna.load_study(study_name=study, storage=f"sqlite:///{tmp / 'runs' / 'search' / study / 'study.db'}")


def test_a_trial_keeps_the_averaged_weights_and_leaves_out_the_outputs_for_a_person():
    """EMAWeights decides which weights are validated, so a trial ranks what the config will train;
    samples and continuations are outputs (and ContinuationComparison reads the test split)."""
    config = yaml.safe_load((ROOT / "configs" / "jsb_lstm.yaml").read_text())
    config["trainer"]["callbacks"] = config["trainer"].pop("callbacks+")
    names = [c["class_path"].rsplit(".", 1)[-1] for c in trial_config(config, "s", 3)["trainer"]["callbacks"]]
    assert names == ["EMAWeights", "EarlyStopping"]


@pytest.mark.slow
def test_a_tiny_search_writes_trials_the_best_config_and_a_plot(tiny):
    """Two trials, then a fit of best.yaml (~14 s); the quick subset checks the outputs in the next test."""
    study = run(write_space(tiny))
    trials = load(tiny).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert trials[0].params != trials[1].params
    assert all(math.isfinite(t.value) and t.value > 0 for t in trials)
    # the value is the best validation of the trial (one per epoch, max_epochs 2)
    assert all(t.value == min(t.intermediate_values.values()) and len(t.intermediate_values) == 2 for t in trials)
    folder = tiny / "runs" / "search" / "tiny"
    assert (folder / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # each trial's own config: the trial's values and limits, no output callbacks, the averaged weights kept
    trial_config = yaml.safe_load((folder / "trials" / "trial-001.yaml").read_text())
    assert trial_config["trainer"]["max_epochs"] == 2
    assert trial_config["model"]["init_args"]["network"]["hidden_size"] == trials[1].params["model.network.hidden_size"]
    kept = [c["class_path"].rsplit(".", 1)[-1] for c in trial_config["trainer"]["callbacks"]]
    assert "EMAWeights" in kept and not {"PianoRollSamples", "ContinuationComparison"} & set(kept)

    # best.yaml: the best trial's values over the config, without the trials' limits; it parses and trains
    best = study.best_trial
    namespace, _ = compose(["--config", str(folder / "best.yaml")])
    assert namespace["model.init_args.network.hidden_size"] == best.params["model.network.hidden_size"]
    assert namespace["optimizer.init_args.lr"] == pytest.approx(best.params["optimizer.lr"])
    assert namespace["trainer.max_epochs"] == 500, "the config's own budget, not the trial's"
    assert any(c.class_path.endswith("ContinuationComparison") for c in namespace["trainer.callbacks"])
    from seqmodels.cli import main as cli_main

    cli = cli_main(["fit", "--config", str(folder / "best.yaml"), "--trainer.max_epochs=1", *QUIET])
    assert math.isfinite(float(cli.trainer.callback_metrics["val/nll"]))


@pytest.mark.slow
def test_running_the_command_again_resumes_the_study(tiny):
    """Three commands (~15 s); the quick subset resumes a study in the next test."""
    space = write_space(tiny, budget={"trials": 1, "max_epochs": 1})
    run(space)
    before = [(t.number, t.params, t.value, t.datetime_complete) for t in load(tiny).trials]
    run(space, "--trials", "2")
    trials = load(tiny).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert [(t.number, t.params, t.value, t.datetime_complete) for t in trials[:1]] == before
    run(space, "--trials", "2")  # done: nothing more runs
    assert len(load(tiny).trials) == 2


@pytest.mark.slow  # a trial that trains: ~7 s
def test_a_trial_left_running_by_a_killed_process_does_not_block_the_resume(tiny, capsys):
    space = write_space(tiny, budget={"trials": 1, "max_epochs": 1})
    storage = f"sqlite:///{tiny / 'runs' / 'search' / 'tiny' / 'study.db'}"
    (tiny / "runs" / "search" / "tiny").mkdir(parents=True)
    killed = optuna.create_study(study_name="tiny", storage=storage).ask()  # never told: RUNNING
    run(space)
    trials = load(tiny).trials
    assert trials[killed.number].state == TrialState.FAIL
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE]
    assert "trial 0 was left running by a process that stopped" in capsys.readouterr().err
    folder = tiny / "runs" / "search" / "tiny"
    assert (folder / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    namespace, _ = compose(["--config", str(folder / "best.yaml")])  # python cli.py fit --config best.yaml parses it
    assert namespace["model.init_args.network.hidden_size"] == trials[1].params["model.network.hidden_size"]


@pytest.mark.slow
def test_a_trial_that_fails_is_noted_and_the_search_goes_on_unless_it_is_the_first(tiny, monkeypatch, capsys):
    """A later trial that fails (an internal error, a value that breaks the model) is marked
    failed with its error and counted; the first trial of a command, or three in a row, stop
    the search with the error."""
    from seqmodels import cli

    calls = []

    class Flaky(cli.SeqCLI):
        def __init__(self, *args, **kwargs):
            if "trainer_defaults" in kwargs:  # a trial's run (composing a config passes none)
                calls.append(1)
                if len(calls) in fail_at:
                    raise LookupError("a parser's state went wrong")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(cli, "SeqCLI", Flaky)
    space = write_space(tiny, budget={"trials": 3, "max_epochs": 1})
    fail_at = {2}
    run(space)
    trials = load(tiny).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["error"] == "LookupError: a parser's state went wrong"
    assert "trial 1: failed (LookupError: a parser's state went wrong); the search goes on" in capsys.readouterr().out
    calls.clear()
    fail_at = {1}  # the first trial of this command: the error stops it
    with pytest.raises(LookupError, match="a parser's state went wrong"):
        run(space, "--trials", "4")
    calls.clear()
    fail_at = {2, 3, 4}  # three in a row
    with pytest.raises(LookupError):
        run(space, "--trials", "9")
    assert [t.state for t in load(tiny).trials][-3:] == [TrialState.FAIL] * 3


@pytest.mark.slow
def test_a_resumed_search_draws_what_an_uninterrupted_one_draws(tiny):
    """Trial k is drawn with seed + k: two trials then a third equal three in one go."""
    space = write_space(tiny)
    run(space)
    run(space, "--trials", "3")
    run(space, "--trials", "3", "--study", "again")
    resumed, fresh = load(tiny).trials, load(tiny, "again").trials
    assert [t.params for t in resumed] == [t.params for t in fresh]
    assert len({t.params["optimizer.lr"] for t in fresh}) == 3


@pytest.mark.slow
def test_bad_trials_are_pruned_after_a_validation(tiny):
    space = write_space(tiny, budget={"trials": 1, "max_epochs": 3},
                        pruner={"type": "threshold", "upper": 0.0, "n_warmup_steps": 0})  # val/nll > 0: pruned
    run(space)
    (trial,) = load(tiny).trials
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [0], "stopped after its first epoch"


class WatchedRolls(dict):
    """The splits of a file, noting every read of the test split."""

    reads: list[str] = []

    def __getitem__(self, key):
        if key == "test":
            self.reads.append("test")
        return super().__getitem__(key)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def items(self):
        self.reads.append("test")
        return super().items()

    values = items


@pytest.fixture
def watched_test_split(monkeypatch):
    import data_modules.chorales as chorales

    real = chorales.load_file
    WatchedRolls.reads = []
    monkeypatch.setattr(chorales, "load_file", lambda path: WatchedRolls(real(path)))

    def refuse(self):
        WatchedRolls.reads.append("test_dataloader")
        raise AssertionError("the test loader was built")

    monkeypatch.setattr(chorales.ChoralesDataModule, "test_dataloader", refuse)
    return WatchedRolls.reads


@pytest.mark.slow
def test_the_search_never_reads_the_test_split(tiny, watched_test_split):
    run(write_space(tiny, budget={"trials": 1, "max_epochs": 1}))
    assert load(tiny).trials[0].state == TrialState.COMPLETE
    assert watched_test_split == []
    # the watch sees a read: a plain fit of the same config reads it (ContinuationComparison, at the end)
    from seqmodels.cli import main as cli_main

    cli_main(["fit", "--config", str(ROOT / "configs" / "jsb_lstm.yaml"), "--data.init_args.path=tiny.pickle",
              "--model.init_args.network.hidden_size=4", "--trainer.max_epochs=1", *QUIET])
    assert "test" in watched_test_split


BAD = {
    "unknown key": ({"params": {"model.init_args.network.hiden_size": {"type": "int", "low": 4, "high": 8}}},
                    "model.init_args.network.hiden_size is not a key of the config"),
    "inverted range": ({"params": {"optimizer.init_args.lr": {"type": "float", "low": 0.1, "high": 0.01}}},
                       "empty or inverted range: low (0.1) must be below high (0.01)"),
    "empty range": ({"params": {"model.init_args.network.hidden_size": {"type": "int", "low": 8, "high": 8}}},
                    "empty or inverted range"),
    "unknown type": ({"params": {"optimizer.init_args.lr": {"type": "loguniform", "low": 0.1, "high": 1}}},
                     "unknown type 'loguniform'; use int, float or categorical"),
    "empty choices": ({"params": {"model.init_args.network.cell": {"type": "categorical", "choices": []}}},
                      "choices must be a non-empty list"),
    "a section, not a value": ({"params": {"model.init_args.network": {"type": "categorical", "choices": [1]}}},
                               "is a section of the config, not a value"),
    "a choice the config refuses": ({"params": {"model.init_args.network.cell": {"type": "categorical",
                                                                                 "choices": ["lstm", "lstn"]}}},
                                    "model.network.cell"),
    "test metric": ({"metric": "test/nll"}, "a search never looks at the test split"),
    "unknown field": ({"trails": 3}, "unknown field(s) ['trails']"),
}


@pytest.mark.parametrize("case", mark_slow(list(BAD), "a choice the config refuses"))  # it composes the config
def test_bad_input_is_one_line(tiny, capsys, case):
    changes, expected = BAD[case]
    with pytest.raises(SystemExit) as info:
        run(write_space(tiny, **changes))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tiny / "runs" / "search").exists(), "nothing is written"


def test_a_missing_space_file_is_one_line(tiny, capsys):
    with pytest.raises(SystemExit) as info:
        run("configs/search/no_such.yaml")
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: search space file configs/search/no_such.yaml does not exist; e.g. configs/search/jsb_lstm.yaml"]


@pytest.mark.slow
def test_the_shipped_space_files_name_keys_of_their_configs(tmp_path):
    from seqmodels.search import check_keys, read_space

    for path in sorted((ROOT / "configs" / "search").glob("*.yaml")):
        space = read_space(path)
        check_keys(space, [a for c in space.configs for a in ("--config", c)])
