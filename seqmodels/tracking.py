"""Weights & Biases the way its users expect it, on top of Lightning's ``WandbLogger``.

A run of ``python cli.py fit --config configs/shakespeare_lstm.yaml`` shows up as

    name     char-lm-lstm-2x256           task, cell, layers x hidden (``describe_run``)
    tags     task:char-lm  cell:lstm  impl:auto  data:shakespeare
    group    shakespeare_lstm             the config file it came from
    config   model.hidden_size, optimizer.lr, data.batch_size, ...   flat, logged once
    summary  val/loss.min beside val/loss.last (``BEST``), so the runs table ranks by the best

Each of name, tags and group is only a default: ``--trainer.logger.init_args.name my-run``
(or ``tags``, ``group``) replaces it. Without an API key the run is logged offline and says
so in one line, with the command that uploads it; wandb's own console lines are silenced then.
"""
from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from seqmodels import compat

# The summary keeps the best of these beside the last (lower is better, except accuracy).
BEST = {"val/loss": "min", "val/nll": "min", "val/bpc": "min", "val/ppl": "min",
        "val/mse": "min", "val/mae": "min", "val/acc": "max"}
OFFLINE_MODES = ("offline", "dryrun")


def wandb_has_credentials() -> bool:
    """True if wandb could log in without asking: an API key in the env or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def use_wandb_offline_without_key() -> None:
    """With no W&B credentials and no WANDB_MODE chosen, log offline instead of prompting for a
    login (or failing after a few seconds without a terminal)."""
    if not os.environ.get("WANDB_MODE") and not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` plus ``tags`` and ``group`` as arguments, the best value of
    every validation metric in the run summary (``BEST``), and, offline, one line instead of
    wandb's console output. Every other argument is Lightning's (``project``, ``save_dir``,
    ``log_model``: checkpoints as W&B artifacts, ...).

    Args:
        name: the run's display name (the CLI derives one from task, cell and size).
        tags: the run's tags (the CLI: task, cell, impl and dataset).
        group: runs grouped together in the W&B UI (the CLI: the config file's name).
    """

    def __init__(self, name: str | None = None, tags: list[str] | None = None, group: str | None = None,
                 **kwargs) -> None:
        use_wandb_offline_without_key()
        if kwargs.get("offline") or os.environ.get("WANDB_MODE") in OFFLINE_MODES:
            kwargs["settings"] = {**dict(kwargs.get("settings") or {}), "silent": True}
        super().__init__(name=name, tags=list(tags) if tags else None, group=group, **kwargs)
        init = compat.wandb_init_kwargs(self)
        if init.get("anonymous") is None:
            init.pop("anonymous", None)
        self._described = False

    @property
    @rank_zero_experiment
    def experiment(self):
        run = LightningWandbLogger.experiment.fget(self)
        if not self._described:
            self._described = True
            for metric, best in BEST.items():
                run.define_metric(metric, summary=f"{best},last", step_metric="trainer/global_step")
            if run.settings.mode in OFFLINE_MODES:
                folder = Path(run.dir).parent
                if folder.is_relative_to(Path.cwd()):
                    folder = folder.relative_to(Path.cwd())
                why = "" if wandb_has_credentials() else ", no API key configured"
                print(f"W&B: logging offline{why}: this run is in {folder}/; upload it with "
                      f"`wandb sync {folder}` (or `wandb login` before the next run)", file=sys.stderr)
        return run


def _stem(source) -> str:
    first = source[0] if isinstance(source, (list, tuple)) and source else source
    name = Path(urlparse(str(first)).path).name or str(first)
    return name.split(".")[0] + (f"+{len(source) - 1}" if isinstance(source, (list, tuple)) and len(source) > 1 else "")


def describe_run(model: dict, data: dict, config_files: list) -> dict:
    """The default name, tags and group of a run, from its resolved config.

    ``model``/``data`` are the ``{class_path, init_args}`` of the config; the task and the
    dataset names come from the classes (``task_name``, ``dataset_name``), or from the file,
    URL or Hub dataset the data is read from.
    """
    from jsonargparse import Namespace

    def plain(value):
        return value.as_dict() if isinstance(value, Namespace) else dict(value or {})

    model_args, data_args = plain(model.get("init_args")), plain(data.get("init_args"))
    net = plain(model_args.get("network"))
    model_cls, data_cls = import_class(model.get("class_path")), import_class(data.get("class_path"))
    task = getattr(model_cls, "task_name", None) or str(model.get("class_path", "model")).rsplit(".", 1)[-1].lower()
    cell = str(net.get("cell", "rnn"))
    if cell == "lstm" and net.get("peephole"):
        cell = "lstm-peephole"
    if cell == "rnn" and net.get("nonlinearity") == "relu":
        cell = "rnn-relu"
    source = next((data_args[k] for k in ("path", "url", "hub") if data_args.get(k)), None)
    dataset = _stem(source) if source else getattr(data_cls, "dataset_name", None) or \
        str(data.get("class_path", "data")).rsplit(".", 1)[-1].removesuffix("DataModule").lower()
    size = f"{net.get('num_layers', 1)}x{net.get('hidden_size', '?')}"
    group = Path(str(config_files[-1])).stem if config_files else task
    return {"name": f"{task}-{cell}-{size}",
            "tags": [f"task:{task}", f"cell:{cell}", f"impl:{net.get('impl', 'auto')}", f"data:{dataset}"],
            "group": group}


def import_class(class_path: str | None):
    import importlib

    if not class_path or "." not in str(class_path):
        return None
    module, name = str(class_path).rsplit(".", 1)
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def flat_config(config: dict) -> dict:
    """The resolved CLI config as one level of dotted keys, the way a runs table reads it:
    ``class_path``/``init_args`` levels folded away (``optimizer.lr``, ``optimizer.class_path``),
    the network's fields lifted into the model (``model.hidden_size``), a list of classes
    (callbacks, plugins) as the list of their names, and the logger's own settings left out."""
    out: dict = {}

    def walk(value, key: str) -> None:
        if isinstance(value, dict) and "class_path" in value:
            out[f"{key}.class_path"] = value["class_path"]
            walk(value.get("init_args") or {}, key)
        elif isinstance(value, dict):
            for k, v in value.items():
                lifted = key == "model" and k == "network" and isinstance(v, dict) and not set(v) & set(value)
                walk(v, key if lifted else f"{key}.{k}" if key else k)
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "class_path" in v for v in value):
            out[key] = [str(v["class_path"]).rsplit(".", 1)[-1] for v in value]
        else:
            out[key] = value

    walk({k: v for k, v in config.items() if k not in ("config", "__default_config__")}, "")
    return {k: v for k, v in out.items() if not k.startswith("trainer.logger")}
