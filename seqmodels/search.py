"""A reproducible hyperparameter search over a config, with Optuna (docs/search.md):

    python -m seqmodels.search configs/search/jsb_lstm.yaml --data.init_args.path JSB_Chorales.mat --trials 30

The space file names the config(s) a search starts from, the metric and its direction, the
budget and the parameters as dotted LightningCLI keys (``read_space``). Every trial is a
normal ``fit`` of the project's CLI (``SeqCLI``: base.yaml, the config, its callbacks, its
logger) from a config file of its own, ``<output>/<study>/trials/trial-NNN.yaml``, which
``python cli.py fit --config`` reruns as it is. Trials only fit and validate: no trial ever
runs ``test``, and the output callbacks of ``seqmodels.callbacks`` (samples, continuations,
prediction files: one run's outputs for a person, and ``ContinuationComparison`` reads the test
split) are left out of their configs; ``EMAWeights`` stays, since it decides what is validated.

The study lives in ``<output>/<study>/study.db`` (SQLite): running the same command again
resumes it. Trials a killed process left RUNNING are marked failed and do not count; finished
ones are kept. Trial k's parameters are drawn by a TPE sampler seeded with ``seed + k``, so a
resumed search draws what an uninterrupted one would have. Bad trials are pruned after each
validation (optuna-integration's ``PyTorchLightningPruningCallback`` on the metric; a median
pruner by default). After each trial ``best.yaml`` holds the best config so far, and at the
end ``history.png`` (and ``importances.png`` once there are enough trials) plots the study.
"""
from __future__ import annotations

import argparse
import contextvars
import difflib
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from lightning.pytorch import Callback

from seqmodels.errors import ConfigError, TrainingDiverged, find_user_error

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The trials hand their arguments to LightningCLI while sys.argv holds the search's: intended here.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
SPACE_KEYS = ("study", "config", "metric", "direction", "seed", "budget", "fixed", "params", "pruner")
BUDGET_KEYS = ("trials", "minutes", "max_epochs", "max_time")
PARAM_KEYS = {"int": ("type", "low", "high", "step", "log"), "float": ("type", "low", "high", "step", "log"),
              "categorical": ("type", "choices")}
PRUNERS = ("median", "percentile", "threshold", "none")
# The callbacks of seqmodels.callbacks are outputs for a person (samples, continuations, prediction
# files), left out of a trial: not for a search, and ContinuationComparison reads the test split;
# a new one is left out too until it is named here. EMAWeights stays: it decides which weights
# are validated, so the trials must rank what the config will train.
LEFT_OUT_CALLBACKS = "seqmodels.callbacks."
KEPT_CALLBACKS = ("seqmodels.callbacks.EMAWeights",)
MIN_TRIALS_FOR_IMPORTANCES = 5
MAX_FAILURES_IN_A_ROW = 3  # a trial that fails (not the first of a command) is noted and the search goes on, up to this
DEFAULT_PRUNER = {"type": "median", "n_startup_trials": 5, "n_warmup_steps": 5}


# ---- the space file ------------------------------------------------------------------------
@dataclass
class Param:
    """One searched value: a dotted LightningCLI key and its distribution."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: list = field(default_factory=list)

    @property
    def name(self) -> str:
        """The name in Optuna and the plots: the key without ``init_args``."""
        return self.key.replace(".init_args.", ".")

    def suggest(self, trial):
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)
        return trial.suggest_categorical(self.name, self.choices)

    def ends(self) -> list:
        """The values at both ends of the range (every choice), for checking the space."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


@dataclass
class Space:
    path: Path
    study: str
    configs: list[str]
    metric: str
    direction: str
    seed: int
    trials: int | None
    minutes: float | None
    limits: dict
    fixed: dict
    params: list[Param]
    pruner: dict


def _number(value, what: str, integer: bool = False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{what} must be {'an integer' if integer else 'a number'}, got {value!r}")
    return value


def read_param(key: str, spec, where: str) -> Param:
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{where}: params.{key} must be a mapping with a type (int, float or categorical), "
                          f"e.g. {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}; got {spec!r}")
    kind = spec["type"]
    if kind not in PARAM_KEYS:
        raise ConfigError(f"{where}: params.{key}: unknown type {kind!r}; use int, float or categorical")
    unknown = sorted(set(spec) - set(PARAM_KEYS[kind]))
    if unknown:
        raise ConfigError(f"{where}: params.{key}: unknown field(s) {unknown} for type {kind}; "
                          f"its fields: {', '.join(PARAM_KEYS[kind])}")
    what = f"{where}: params.{key}"
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{what}: choices must be a non-empty list, got {choices!r}")
        bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad:
            raise ConfigError(f"{what}: choices must be numbers, strings, booleans or null, got {bad[0]!r}")
        return Param(key, kind, choices=choices)
    integer = kind == "int"
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{what}: a range needs low and high, e.g. {{type: {kind}, low: 1, high: 10}}")
    low, high = _number(spec["low"], f"{what}.low", integer), _number(spec["high"], f"{what}.high", integer)
    if not low < high:
        raise ConfigError(f"{what}: empty or inverted range: low ({low}) must be below high ({high})")
    step = spec.get("step")
    if step is not None and not _number(step, f"{what}.step", integer) > 0:
        raise ConfigError(f"{what}.step must be > 0, got {step}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{what}.log must be true or false, got {log!r}")
    if log and step not in (None, 1):
        raise ConfigError(f"{what}: log: true takes no step (a log scale has no fixed step)")
    if log and not low > 0:
        raise ConfigError(f"{what}: log: true needs low > 0, got {low}")
    return Param(key, kind, low, high, step, log)


def find_config(name: str, where: str) -> str:
    """A config file: as given, else relative to the project root (so the shipped space files
    work from any folder)."""
    for candidate in (Path(name), PROJECT_ROOT / name):
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(f"{where}: config {name} does not exist (looked in the current folder and in {PROJECT_ROOT})")


def read_space(path: str | Path) -> Space:
    """The space file, checked: every mistake is a ConfigError naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file {path} does not exist; e.g. configs/search/jsb_lstm.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid YAML ({' '.join(str(err).split())[:200]})") from None
    where = str(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a search space is a YAML mapping (config, metric, budget, params); got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SPACE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; the fields are {', '.join(SPACE_KEYS)}")
    configs = raw.get("config")
    configs = [configs] if isinstance(configs, str) else configs
    if not configs or not isinstance(configs, list) or not all(isinstance(c, str) for c in configs):
        raise ConfigError(f"{where}: config must name the config file(s) the search starts from, e.g. configs/jsb_lstm.yaml")
    metric = raw.get("metric", "val/loss")
    if not isinstance(metric, str) or not metric.startswith("val/"):
        raise ConfigError(f"{where}: metric must be a validation metric (val/...), got {metric!r}: "
                          "a search never looks at the test split")
    direction = raw.get("direction", "minimize")
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"{where}: direction must be minimize or maximize, got {direction!r}")
    budget = raw.get("budget") or {}
    if not isinstance(budget, dict) or set(budget) - set(BUDGET_KEYS):
        raise ConfigError(f"{where}: budget takes {', '.join(BUDGET_KEYS)}; got {budget!r}")
    trials = budget.get("trials")
    if trials is not None and not _number(trials, f"{where}: budget.trials", integer=True) >= 1:
        raise ConfigError(f"{where}: budget.trials must be >= 1, got {trials}")
    minutes = budget.get("minutes")
    if minutes is not None and not _number(minutes, f"{where}: budget.minutes") > 0:
        raise ConfigError(f"{where}: budget.minutes must be > 0, got {minutes}")
    limits = {f"trainer.{k}": budget[k] for k in ("max_epochs", "max_time") if budget.get(k) is not None}
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{where}: fixed must map dotted keys to values, e.g. data.init_args.batch_size: 16")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{where}: params must map at least one dotted key to a range or choices, e.g. "
                          "optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}")
    pruner = raw.get("pruner", DEFAULT_PRUNER)
    if pruner is None or pruner is False:
        pruner = {"type": "none"}
    if not isinstance(pruner, dict) or pruner.get("type", "median") not in PRUNERS:
        raise ConfigError(f"{where}: pruner.type must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    seed = _number(raw.get("seed", 0), f"{where}: seed", integer=True)
    study = raw.get("study") or path.stem
    if not isinstance(study, str) or not study.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"{where}: study must be a simple name (letters, digits, - _ .), got {study!r}")
    return Space(path, study, [find_config(c, where) for c in configs], metric, direction, seed, trials, minutes,
                 limits, dict(fixed), [read_param(str(k), v, where) for k, v in params.items()], dict(pruner))


# ---- configs through the project's CLI ------------------------------------------------------
def option(key: str, value) -> str:
    """A command-line override, ``--key=value`` (anything but a string as JSON)."""
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


class _Parsed(Exception):
    def __init__(self, cli) -> None:
        super().__init__("parsed")
        self.cli = cli


def _parse_only_cli():
    from seqmodels.cli import SeqCLI

    class ParseOnly(SeqCLI):
        """The CLI up to its parsed config: nothing is instantiated or run."""

        def before_instantiate_classes(self) -> None:
            raise _Parsed(self)

    return ParseOnly


def compose(args: list[str]) -> tuple:
    """The ``fit`` config that ``python cli.py fit <args>`` would run (base.yaml first): the
    parsed Namespace and the same as a plain dict, as the CLI would save it. A config the parser
    rejects is a ConfigError (one line)."""
    import argparse as _argparse

    from seqmodels.cli import SeqTrainer, condense_parser_error

    seed_log = logging.getLogger("lightning.fabric.utilities.seed")  # "Seed set to": no run here
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)
    try:
        _parse_only_cli()(args=["fit", *args], trainer_class=SeqTrainer, parser_kwargs={"exit_on_error": False})
    except _Parsed as parsed:
        cli = parsed.cli
    except _argparse.ArgumentError as err:
        raise ConfigError(condense_parser_error(str(err))) from None
    finally:
        seed_log.setLevel(level)
    text = cli.parser.dump(cli.config)
    return cli.config["fit"], yaml.safe_load(text)["fit"]


def check_keys(space: Space, base_args: list[str], command_line: list[str] = ()):
    """Every key of params and fixed is a value of the composed config, and every value at both
    ends of each range (and every choice) parses. Returns the composed config (a Namespace)."""
    from jsonargparse import Namespace

    config, _ = compose(base_args + list(command_line))
    keys = list(config.keys())
    for key in [p.key for p in space.params] + list(space.fixed):
        if key not in config:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{space.path}: {key} is not a key of the config ({', '.join(space.configs)}){hint} "
                              "(`python cli.py fit --config <config> --print_config` shows them all)")
        if isinstance(config[key], Namespace):
            raise ConfigError(f"{space.path}: {key} is a section of the config, not a value; name one of its keys")
    rounds = max(len(p.ends()) for p in space.params)
    for i in range(rounds):
        values = {p.key: p.ends()[i % len(p.ends())] for p in space.params}
        compose(trial_args(space, base_args, command_line, values))
    return config


def trial_args(space: Space, base_args: list[str], command_line, values: dict, limits: bool = True) -> list[str]:
    """The CLI's arguments for a trial, each overriding those before: the config files, the space's
    fixed keys and per-trial limits, the search's command line, the trial's values."""
    fixed = {**space.fixed, **(space.limits if limits else {})}
    return [*base_args, *(option(k, v) for k, v in fixed.items()), *command_line,
            *(option(k, v) for k, v in values.items())]


def trial_config(config: dict, study: str, number: int) -> dict:
    """A trial's config: the output callbacks (``LEFT_OUT_CALLBACKS`` but ``KEPT_CALLBACKS``) left out, the W&B run named
    after the trial and grouped by study."""
    config = dict(config)
    trainer = dict(config.get("trainer") or {})
    callbacks = trainer.get("callbacks") or []
    names = [str(c.get("class_path", "") if isinstance(c, dict) else c) for c in callbacks]
    trainer["callbacks"] = [c for c, name in zip(callbacks, names)
                            if name in KEPT_CALLBACKS or not name.startswith(LEFT_OUT_CALLBACKS)]
    logger = trainer.get("logger")
    if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("WandbLogger"):
        args = dict(logger.get("init_args") or {})
        args["name"] = args.get("name") or f"{study}-trial{number:03d}"
        args["group"] = args.get("group") or f"search-{study}"
        trainer["logger"] = {**logger, "init_args": args}
    config["trainer"] = trainer
    return config


def write_yaml(path: Path, config: dict, header: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(config, sort_keys=False)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---- the study -----------------------------------------------------------------------------
def make_pruner(spec: dict, where: Path):
    import optuna

    kwargs = {k: v for k, v in spec.items() if k != "type"}
    cls = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
           "threshold": optuna.pruners.ThresholdPruner, "none": optuna.pruners.NopPruner}[spec.get("type", "median")]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: pruner: {err} (optuna.pruners.{cls.__name__})") from None


def counted(trial) -> bool:
    """Trials the budget counts: finished, pruned, or failed by themselves (diverged); not those
    a killed or interrupted process left behind."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or \
        (trial.state == TrialState.FAIL and "error" in trial.user_attrs)


class MetricTrace(Callback):
    """The metric after each validation (not the sanity check)."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.values: list[float] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if not trainer.sanity_checking and value is not None:
            self.values.append(float(value))


def _finish_wandb() -> None:
    """Lightning never ends the W&B run: each trial gets its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _describe(params: dict) -> str:
    def short(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return " ".join(f"{k.rsplit('.', 1)[-1]}={short(v)}" for k, v in params.items())


class Search:
    def __init__(self, space: Space, base_args: list[str], command_line: list[str], output: Path, trials: int,
                 minutes: float | None) -> None:
        self.space, self.base_args, self.command_line = space, base_args, list(command_line)
        self.trials, self.minutes = trials, minutes
        self.folder = output / space.study
        self.build = None  # the running trial's BuildBoundary
        self.composed = None  # (trial number, its composed config)
        self.limit_defaults: dict = {}  # the config's own value of each per-trial limit

    def open(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.folder.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{(self.folder / 'study.db').resolve()}"
        study = optuna.create_study(study_name=self.space.study, storage=storage, direction=self.space.direction,
                                    load_if_exists=True, pruner=make_pruner(self.space.pruner, self.space.path))
        if study.direction.name.lower() != self.space.direction:
            raise ConfigError(f"study {self.space.study} in {self.folder} was made to {study.direction.name.lower()}; "
                              f"the space says {self.space.direction}: give it another study name")
        from optuna.trial import TrialState

        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(trial.number, state=TrialState.FAIL)
            print(f"trial {trial.number} was left running by a process that stopped: marked failed, not counted",
                  file=sys.stderr)
        study.set_user_attr("command", self.base_args + self.command_line)
        return study

    def run(self) -> "optuna.Study":  # noqa: F821
        study = self.open()
        done = sum(counted(t) for t in study.trials)
        if done:
            print(f"study {self.space.study}: resuming with {done} of {self.trials} trials done ({self.folder / 'study.db'})")
        start = time.monotonic()
        self.ran, self.failed_in_a_row = 0, 0  # trials this command started; failures since the last success
        try:
            while sum(counted(t) for t in study.trials) < self.trials:
                if self.minutes is not None and time.monotonic() - start >= self.minutes * 60:
                    print(f"budget: {self.minutes:g} minutes spent; no new trial starts (run the command again to go on)")
                    break
                # each trial in a context of its own: the parser's context variables (jsonargparse)
                # one trial leaves behind cannot reach the next
                contextvars.copy_context().run(self.trial, study)
                self.ran += 1
        finally:
            self.write_plots(study)
        self.report(study)
        return study

    def trial(self, study) -> None:
        import optuna
        from optuna_integration import PyTorchLightningPruningCallback
        from optuna.samplers import TPESampler
        from optuna.trial import TrialState

        from seqmodels.cli import BuildBoundary, SeqCLI, SeqTrainer

        space = self.space
        study.sampler = TPESampler(seed=space.seed + len(study.trials))  # trial k: seed + k, resumed or not
        trial = study.ask()
        values = {p.key: p.suggest(trial) for p in space.params}
        _, config = compose(trial_args(space, self.base_args, self.command_line, values))
        self.composed = (trial.number, config)
        path = self.folder / "trials" / f"trial-{trial.number:03d}.yaml"
        write_yaml(path, trial_config(config, space.study, trial.number),
                   [f"trial {trial.number} of search study {space.study} ({space.path}); rerun it with",
                    f"python cli.py fit --config {path}"])
        trial.set_user_attr("config", str(path))
        trace = MetricTrace(space.metric)
        self.build = BuildBoundary()
        began = time.monotonic()
        cli = None
        try:
            cli = SeqCLI(args=["fit", "--config", str(path)], trainer_class=SeqTrainer, build=self.build,
                         parser_kwargs={"exit_on_error": False},
                         trainer_defaults={"callbacks": [trace,  # before the pruning callback, which raises
                                                         PyTorchLightningPruningCallback(trial, monitor=space.metric)]})
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            epoch = len(trace.values) - 1
            print(f"trial {trial.number}: pruned after epoch {epoch} ({space.metric} "
                  f"{trace.values[-1]:.4f}), {time.monotonic() - began:.0f} s: {_describe(values)}")
            return
        except Exception as err:
            user_error = find_user_error(err)
            if isinstance(user_error, TrainingDiverged) and not self.build.building:
                trial.set_user_attr("error", str(user_error))
                study.tell(trial, state=TrialState.FAIL)
                print(f"trial {trial.number}: failed ({user_error}): {_describe(values)}")
                return
            if self.ran == 0 or self.failed_in_a_row + 1 >= MAX_FAILURES_IN_A_ROW:
                study.tell(trial, state=TrialState.FAIL)
                raise  # the first trial of a command, or several in a row: the config, not this trial
            self.failed_in_a_row += 1
            line = " ".join(str(user_error or err).split())[:300]
            trial.set_user_attr("error", f"{type(err).__name__}: {line}")
            study.tell(trial, state=TrialState.FAIL)
            print(f"trial {trial.number}: failed ({type(err).__name__}: {line}); the search goes on: "
                  f"{_describe(values)}")
            return
        finally:
            _finish_wandb()
        self.failed_in_a_row = 0
        if not trace.values:
            study.tell(trial, state=TrialState.FAIL)
            logged = sorted(k for k in cli.trainer.callback_metrics if k.startswith("val/"))
            raise ConfigError(f"{space.path}: metric {space.metric} was never logged in validation; "
                              f"the model logs {', '.join(logged) or 'no val/ metric'}")
        best = (min if space.direction == "minimize" else max)(trace.values)
        from seqmodels.runs import run_dir

        trial.set_user_attr("run", run_dir(cli.trainer))
        trial.set_user_attr("epochs", len(trace.values))
        study.tell(trial, best)
        line = (f"trial {trial.number}: {space.metric} {best:.4f} (best of {len(trace.values)} epochs), "
                f"{time.monotonic() - began:.0f} s: {_describe(values)}")
        if study.best_trial.number == trial.number:
            self.write_best(study)
            line += "  <- best so far"
        print(line)

    def write_best(self, study) -> Path:
        """The best trial's values over the config, the command line and ``fixed``, without the
        per-trial limits: ``python cli.py fit --config best.yaml`` trains it as the config says."""
        best = study.best_trial
        by_name = {p.name: p.key for p in self.space.params}
        values = {by_name[n]: v for n, v in best.params.items() if n in by_name}
        if self.composed and self.composed[0] == best.number:  # its config, the limits as the config has them
            config = yaml.safe_load(yaml.safe_dump(self.composed[1]))
            for key in self.space.limits:
                *parents, leaf = key.split(".")
                section = config
                for part in parents:
                    section = section[part]
                section[leaf] = self.limit_defaults[key]
        else:
            _, config = compose(trial_args(self.space, self.base_args, self.command_line, values, limits=False))
        path = self.folder / "best.yaml"
        write_yaml(path, config, [
            f"the best of search study {self.space.study} ({self.space.path}): trial {best.number}, "
            f"{self.space.metric} {best.value:.4f}",
            f"values: {_describe(values)}; the trials' limits ({self.space.limits or 'none'}) are not in it",
            f"python cli.py fit --config {path}"])
        return path

    def write_plots(self, study) -> list[Path]:
        """history.png (every trial's value and the best so far) and, with enough finished
        trials, importances.png (Optuna's fANOVA parameter importances)."""
        from optuna.trial import TrialState

        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        if not complete:
            print("no finished trial yet: no plots")
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import optuna.visualization.matplotlib as ovm

        written = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
            plots = [("history.png", ovm.plot_optimization_history)]
            if len(complete) >= MIN_TRIALS_FOR_IMPORTANCES and len(self.space.params) >= 2:
                plots.append(("importances.png", ovm.plot_param_importances))
            else:
                print(f"importances need {MIN_TRIALS_FOR_IMPORTANCES} finished trials and 2 parameters "
                      f"(have {len(complete)} and {len(self.space.params)}): plotted the optimization history only")
            for name, plot in plots:
                try:
                    ax = plot(study, target_name=self.space.metric)
                except (ValueError, RuntimeError) as err:
                    print(f"{name}: not plotted ({err})")
                    continue
                fig = ax.figure
                fig.set_size_inches(9, 5)
                fig.tight_layout()
                fig.savefig(self.folder / name, dpi=100)
                plt.close(fig)
                written.append(self.folder / name)
        return written

    def report(self, study) -> None:
        from optuna.trial import TrialState

        states = [t.state for t in study.trials]
        counts = ", ".join(f"{states.count(s)} {s.name.lower()}" for s in
                           (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) if states.count(s))
        print(f"study {self.space.study}: {len(states)} trials ({counts}) in {self.folder / 'study.db'}")
        if any(s == TrialState.COMPLETE for s in states):
            best = study.best_trial
            print(f"best: trial {best.number}, {self.space.metric} {best.value:.4f}: {_describe(best.params)}")
            print(f"train it: python cli.py fit --config {self.folder / 'best.yaml'}")


# ---- the command ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m seqmodels.search", allow_abbrev=False,
        description="A hyperparameter search over a config with Optuna; more options after the space file "
                    "are CLI overrides for every trial, e.g. --data.init_args.path JSB_Chorales.mat (docs/search.md).")
    parser.add_argument("space", help="the search space, e.g. configs/search/jsb_lstm.yaml")
    parser.add_argument("--trials", type=int, default=None, help="trials in the study in all (default: the space's budget.trials)")
    parser.add_argument("--minutes", type=float, default=None, help="start no trial after this many minutes of this command")
    parser.add_argument("--study", default=None, help="the study's name (default: the space's study)")
    parser.add_argument("--output", default="runs/search", help="where studies go: <output>/<study>/ (default runs/search)")
    return parser.parse_known_args(argv)


def search(argv: list[str] | None = None):
    """Run (or resume) the search; returns the Optuna study."""
    args, extra = parse_args(argv)
    space = read_space(args.space)
    if args.study:
        space.study = args.study
    trials = args.trials if args.trials is not None else space.trials
    if trials is None or trials < 1:
        raise ConfigError(f"{space.path}: how many trials? set budget.trials or pass --trials N (>= 1)")
    minutes = args.minutes if args.minutes is not None else space.minutes
    if minutes is not None and not minutes > 0:
        raise ConfigError(f"--minutes must be > 0, got {minutes}")
    base_args = [a for c in space.configs for a in ("--config", c)]
    base = check_keys(space, base_args, extra)
    runner = Search(space, base_args, extra, Path(args.output), trials, minutes)
    runner.limit_defaults = {key: base.get(key) for key in space.limits}
    try:
        return runner.run()
    except Exception as err:
        err.search_build = runner.build  # for main's one line
        raise


def main(argv: list[str] | None = None):
    """``python -m seqmodels.search``: one line on stderr and exit code 2 for bad input, as
    ``python cli.py`` (``seqmodels.cli.one_line_error``): a bad space file, an unknown key, a
    config the parser rejects, and any error while a trial is being built."""
    from seqmodels.cli import one_line_error
    from seqmodels.tracking import use_wandb_offline_without_key

    use_wandb_offline_without_key()
    try:
        return search(argv)
    except Exception as err:
        line = one_line_error(err, getattr(err, "search_build", None))
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
