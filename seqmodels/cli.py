"""The command line: LightningCLI with W&B that never prompts, the config logged once,
and one-line errors for impossible settings.

    python cli.py fit --config configs/sums_lstm.yaml
    python cli.py test --config configs/sums_lstm.yaml --ckpt_path <ckpt>
"""
from __future__ import annotations

import netrc
import os
import sys
import warnings
from urllib.parse import urlparse

import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from seqmodels.errors import find_config_error
from seqmodels.tasks import SequenceModel

# The optimizer and scheduler of the config replace the module's fallback: expected, not news.
warnings.filterwarnings("ignore", message=r".*configure_optimizers` will be overridden by")

CONFIG_FILENAME = "cli_config.yaml"  # not config.yaml: wandb writes its own file of that name


def run_dir(trainer: Trainer) -> str:
    """The run's own directory, ``save_dir/name/version`` (where checkpoints go too)."""
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


def wandb_has_credentials() -> bool:
    """True if wandb could log in without asking: an API key in the env or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def use_wandb_offline_without_key(save_dir: str = ".") -> None:
    """With no W&B credentials and no WANDB_MODE chosen, log offline and say so in one line."""
    if os.environ.get("WANDB_MODE") or wandb_has_credentials():
        return
    os.environ["WANDB_MODE"] = "offline"
    where = os.path.join(save_dir, "wandb")
    print(f"W&B: no API key configured, logging offline to {where}/ "
          f"(upload later with `wandb sync {where}/offline-run-*`, or `wandb login` first)",
          file=sys.stderr)


class LoggedConfigCallback(SaveConfigCallback):
    """Logs the resolved config to the logger once and writes it into the run's directory.

    Nothing goes to ``trainer.log_dir`` (for W&B a fixed folder shared by every run), so a
    second run in the same folder never finds a config file in its way.
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        directory = run_dir(trainer)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_FILENAME), "w") as f:
            f.write(text)
        for logger in trainer.loggers:
            logger.log_hyperparams({"cli_config": yaml.safe_load(text)})


class SeqCLI(LightningCLI):
    """LightningCLI over every SequenceModel and LightningDataModule, by ``class_path``."""

    def __init__(self, args: list[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", LoggedConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"save_to_log_dir": False})
        super().__init__(SequenceModel, LightningDataModule, subclass_mode_model=True,
                         subclass_mode_data=True, args=args, **kwargs)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        logger = config.get("trainer", {}).get("logger")
        loggers = logger if isinstance(logger, list) else [logger]
        for lg in loggers:
            if "WandbLogger" in str(getattr(lg, "class_path", "")):
                use_wandb_offline_without_key(lg.init_args.get("save_dir") or ".")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            config_error = find_config_error(err)
            if config_error is None:
                raise
            print(f"error: {config_error}", file=sys.stderr)
            raise SystemExit(2) from None


def main(args: list[str] | None = None) -> SeqCLI:
    return SeqCLI(args=args)
