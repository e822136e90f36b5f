"""The command line: LightningCLI with W&B that never prompts, the config logged once,
and one-line errors for impossible settings, the project's own and the frameworks' (``main``).

    python cli.py fit --config configs/sums_lstm.yaml
    python cli.py test --config configs/sums_lstm.yaml --ckpt_path <ckpt>
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from seqmodels import compat
from seqmodels.errors import ConfigError, find_framework_error, find_user_error
from seqmodels.runs import run_dir
from seqmodels.sampling import sample
from seqmodels.schedules import WarmupCosineLR, size_to_trainer
from seqmodels.tracking import describe_run, flat_config, use_wandb_offline_without_key
from seqmodels.tasks import SequenceModel

# The optimizer and scheduler of the config replace the module's fallback: expected, not news.
warnings.filterwarnings("ignore", message=r".*configure_optimizers` will be overridden by")
# torchdata 0.11's StatefulDataLoader calls a deprecated torch API at every epoch start and
# warns about it each time; nothing a user can act on.
warnings.filterwarnings("ignore", message=r"'set_vital' is deprecated")
# Third-party notes that are not for the user of this project, dropped by their message (never
# wholesale): Lightning's deprecated pytree call, its multi-worker note on IterableDatasets with a
# length (the text loaders run in the main process), its model-summary size caveat under mixed
# precision, and its advertisement for another logger.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
warnings.filterwarnings("ignore", message=r"Precision .* is not supported by the model summary")
NOT_FOR_THE_USER = ("try installing [litlogger]",)


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in NOT_FOR_THE_USER)


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):  # rank_zero_info's
    logging.getLogger(_name).addFilter(_DropMessages())

CONFIG_FILENAME = "cli_config.yaml"  # not config.yaml: wandb writes its own file of that name


GPU_ACCELERATORS = ("gpu", "cuda")
NEEDS_GPU_PRECISIONS = ("16-mixed", "16", 16)  # float16 autocast needs CUDA's loss scaler


def fit_to_this_machine(trainer: dict) -> None:
    """A config made for a GPU still runs where there is none: on the CPU, with a one-line
    notice each, instead of Lightning's traceback (``accelerator: gpu``) or float16 autocast
    without a loss scaler (``precision: 16-mixed``, where small gradients flush to zero)."""
    import torch

    if torch.cuda.is_available():
        return
    if str(trainer.get("accelerator")) in GPU_ACCELERATORS:
        trainer["accelerator"], trainer["devices"] = "cpu", 1
        print("notice: this config asks for a GPU (trainer.accelerator: gpu) and none is available: training "
              "on the CPU, which is much slower for GPU-sized models (configs without _gpu suit a CPU)",
              file=sys.stderr)
    if trainer.get("precision") in NEEDS_GPU_PRECISIONS:
        trainer["precision"] = "32-true"
        print("notice: precision 16-mixed needs a CUDA GPU (float16 with a loss scaler): running 32-true "
              "on the CPU (bf16-mixed also works there)", file=sys.stderr)


_VERSION_ARG = {"WandbLogger": "id", "CSVLogger": "version", "TensorBoardLogger": "version"}


def resolve_last_checkpoint(config, loggers: list, resume_run: bool) -> None:
    """``--ckpt_path last``: the newest ``last.ckpt`` of any run under the first logger's folder
    (``save_dir/name/*/checkpoints``). For ``fit`` the run continues in that run's folder (the
    logger gets its version, W&B its run id); without one it stays ``last``: Lightning then
    looks in the checkpoint callback's own folder and otherwise starts from scratch, so a
    job script can always pass ``--ckpt_path last``. Every other subcommand (validate, test,
    predict, sample) needs a checkpoint: without one, a one-line error."""
    logger = loggers[0] if loggers else None
    kind = str(getattr(logger, "class_path", "")).rsplit(".", 1)[-1]
    if kind not in _VERSION_ARG:
        return
    args = logger.init_args
    save_dir = args.get("save_dir") or "."
    name = (args.get("project") if kind == "WandbLogger" else args.get("name")) or "lightning_logs"
    found = glob.glob(os.path.join(save_dir, str(name), "*", "checkpoints", "last*.ckpt"))
    where = f"{os.path.join(save_dir, str(name))}/*/checkpoints"
    if not found and not resume_run:
        raise ConfigError(f"--ckpt_path last: no last.ckpt under {where} yet; train first "
                          "(python cli.py fit --config ...) or pass the path of a .ckpt")
    if not found:
        print(f"no last.ckpt under {where}: starting from scratch", file=sys.stderr)
        return
    path = max(found, key=os.path.getmtime)
    config["ckpt_path"] = path
    if resume_run:
        args[_VERSION_ARG[kind]] = Path(path).parent.parent.name
        print(f"resuming from {path}", file=sys.stderr)


class LoggedConfigCallback(SaveConfigCallback):
    """Logs the resolved config to the logger once, flat (``model.hidden_size``,
    ``optimizer.lr``: ``tracking.flat_config``), and writes it into the run's directory.

    Nothing goes to ``trainer.log_dir`` (for W&B a fixed folder shared by every run), so a
    second run in the same folder never finds a config file in its way. In a folder that has a
    config already (a resumed run), the new one replaces it, and is logged, only once the run is
    built (its first batch, see ``BuildBoundary``): a resume that stops with an error keeps the
    run's config as it was.
    """

    _pending: tuple[Trainer, str] | None = None

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        if os.path.exists(os.path.join(run_dir(trainer), CONFIG_FILENAME)):
            self._pending = (trainer, text)
            return
        self._write(trainer, text)

    @staticmethod
    def _write(trainer: Trainer, text: str) -> None:
        directory = run_dir(trainer)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_FILENAME), "w") as f:
            f.write(text)
        for logger in trainer.loggers:
            logger.log_hyperparams(flat_config(yaml.safe_load(text)))

    def _built(self, trainer: Trainer, *args) -> None:
        if self._pending is not None and not trainer.sanity_checking:
            self._write(*self._pending)
            self._pending = None

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _built


class BuildBoundary(Callback):
    """Where building a run ends and running it begins, for ``main``'s one-line errors.

    The build is everything before the model's first batch of real work: parsing the config,
    instantiating the data, model, optimizer, scheduler, callbacks, loggers and Trainer, then,
    inside ``trainer.fit`` (or validate/test/predict), the data's and the model's ``setup``,
    ``configure_model``, ``configure_optimizers`` (the optimizer and scheduler as Lightning
    wraps them, and ``WarmupCosineLR`` sized to the run), restoring a checkpoint, and Lightning's
    loop set-up (dataloaders, ``val_check_interval`` against the epoch). It ends at the first
    training batch (``fit``), the first batch of the evaluation loop (``validate``, ``test``,
    ``predict``), or when ``sample`` starts generating: from then on every error keeps its
    traceback. The sanity check's validation pass runs the model before the first training
    batch; from its first batch to its end it counts as running, not building, so a crash in
    ``validation_step`` or in an epoch-end hook keeps its traceback too.
    """

    def __init__(self) -> None:
        self.built = False
        self.sanity_checking = False

    @property
    def building(self) -> bool:
        return not self.built and not self.sanity_checking

    def end(self, *args) -> None:
        self.built = True

    on_train_batch_start = on_test_batch_start = on_predict_batch_start = end

    def on_validation_batch_start(self, trainer: Trainer, *args) -> None:
        if trainer.sanity_checking:
            self.sanity_checking = True
        else:
            self.built = True

    def on_sanity_check_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.sanity_checking = False


class SeqTrainer(Trainer):
    """Lightning's Trainer plus the ``sample`` subcommand."""

    def sample(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        prime: str | None = None,
        prime_frames: int = 0,
        length: int = 500,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int = 1,
        output: str | None = None,
    ) -> str:
        """Generate from a trained model and print the result.

        Args:
            ckpt_path: the checkpoint to generate from (required).
            prime: text to start from (text models), e.g. "ROMEO:".
            prime_frames: start from the first k frames of a test sequence (music models).
            length: characters or frames to generate.
            temperature: > 0; below 1 sharper, above 1 more random.
            top_k: sample among the k most likely only (0: all).
            seed: the sampling seed; the same seed gives the same sample.
            output: where to write files (music: MIDI and PNG); default next to the checkpoint.
        """
        if not ckpt_path:
            raise ConfigError("sample needs --ckpt_path <checkpoint> (a .ckpt written by fit)")
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        if length < 1:
            raise ConfigError(f"length must be >= 1, got {length}")
        if top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = no limit), got {top_k}")
        load_weights(model, ckpt_path)
        for callback in self.callbacks:
            if isinstance(callback, BuildBoundary):
                callback.end()
        result = sample(model, datamodule, prime=prime, prime_frames=prime_frames, length=length,
                        temperature=temperature, top_k=top_k, seed=seed,
                        output=output or os.path.dirname(os.path.abspath(ckpt_path)))
        print(result)
        return result


def read_checkpoint(ckpt_path: str) -> dict:
    """A Lightning checkpoint read with ``weights_only=True`` (a checkpoint cannot run code)."""
    import torch

    if not os.path.isfile(ckpt_path):
        raise ConfigError(f"ckpt_path {ckpt_path} does not exist; pass a .ckpt written by fit")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or not a checkpoint at all
        raise ConfigError(f"cannot read checkpoint {ckpt_path} ({type(err).__name__}: it is truncated, corrupt "
                          "or not a checkpoint); pass a .ckpt written by fit") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"{ckpt_path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def check_checkpoint_fits(model: LightningModule, checkpoint: dict, ckpt_path: str) -> None:
    """The task's own checks first (e.g. the vocabulary), then the checkpoint's tensors must be
    this model's, name for name and shape for shape."""
    model.on_load_checkpoint(checkpoint)
    ours = model.state_dict()
    theirs = checkpoint["state_dict"]
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or unexpected:
        raise ConfigError(f"checkpoint {ckpt_path} was written by another model or task ({type(model).__name__} "
                          f"lacks {unexpected[:2]}, needs {missing[:2]}); use the config it was trained with")
    for name, tensor in theirs.items():
        if tuple(tensor.shape) != tuple(ours[name].shape):
            raise ConfigError(f"checkpoint {ckpt_path} has {name} of shape {tuple(tensor.shape)}, this model "
                              f"{tuple(ours[name].shape)}: it was trained with another cell or other sizes; use its config")


def load_weights(model: LightningModule, ckpt_path: str) -> None:
    """Load a checkpoint's weights after checking that they fit the model."""
    checkpoint = read_checkpoint(ckpt_path)
    check_checkpoint_fits(model, checkpoint, ckpt_path)
    model.load_state_dict(checkpoint["state_dict"])


def check_writable(directory: str) -> None:
    """Fail early, in one line, when the run could not save its work."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise ConfigError(f"cannot write to {directory} ({err.strerror}); choose another folder with "
                          "--trainer.logger.init_args.save_dir or --trainer.default_root_dir") from None


BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"


def with_base_config(parser_kwargs: dict) -> dict:
    """Every subcommand reads ``configs/base.yaml`` first (trainer, logger, callbacks shared by
    every config), when the project's configs are there."""
    if not BASE_CONFIG.is_file():
        return parser_kwargs
    kwargs = dict(parser_kwargs)
    for subcommand in (*LightningCLI.subcommands(), "sample"):
        kwargs[subcommand] = {"default_config_files": [str(BASE_CONFIG)], **kwargs.get(subcommand, {})}
    return kwargs


class SeqCLI(compat.ConfigFirstCLI, LightningCLI):
    """LightningCLI over every SequenceModel and LightningDataModule, by ``class_path``."""

    def __init__(self, args: list[str] | None = None, build: BuildBoundary | None = None, **kwargs) -> None:
        self.build = build or BuildBoundary()
        kwargs["parser_kwargs"] = with_base_config(kwargs.get("parser_kwargs", {}))
        kwargs.setdefault("save_config_callback", LoggedConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"save_to_log_dir": False})
        super().__init__(SequenceModel, LightningDataModule, subclass_mode_model=True,
                         subclass_mode_data=True, args=args, **kwargs)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        logger = config.get("trainer", {}).get("logger")
        loggers = logger if isinstance(logger, list) else [logger]
        if config.get("ckpt_path") == "last":
            resolve_last_checkpoint(config, loggers, resume_run=self.subcommand == "fit")
        if self.subcommand == "sample":  # sampling logs nothing and runs where it is
            return
        if config.get("trainer") is not None:
            fit_to_this_machine(config["trainer"])
        for lg in loggers:
            if "WandbLogger" in str(getattr(lg, "class_path", "")):
                use_wandb_offline_without_key()
                self._describe_run(config, lg)

    @staticmethod
    def _describe_run(config, logger) -> None:
        """A readable default name, tags and group for the W&B run (``tracking.describe_run``);
        whatever the config or the command line set is kept."""
        import inspect

        from seqmodels.tracking import import_class

        cls = import_class(logger.class_path)
        accepts = inspect.signature(cls).parameters if cls is not None else {}
        described = describe_run(config.get("model") or {}, config.get("data") or {}, config.get("config") or [])
        for key, value in described.items():
            if key in accepts and not logger.init_args.get(key):
                logger.init_args[key] = value

    def add_arguments_to_parser(self, parser) -> None:
        # Sizes that only the data knows go into the model; models without them ignore it.
        parser.link_arguments("data", "model.init_args.vocab", apply_on="instantiate",
                              compute_fn=lambda data: getattr(data, "vocab", None))
        parser.link_arguments("data", "model.init_args.input_size", apply_on="instantiate",
                              compute_fn=lambda data: getattr(data, "input_size", None))

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """Lightning's, plus the ``BuildBoundary`` as the first callback (so that it sees each
        batch start before any other callback's hook runs)."""
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.insert(0, self.build)
        return trainer

    def _check_before_run(self) -> None:
        """Before fit/validate/test/predict: the checkpoint fits and the output is writable."""
        config = self.config_init[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not str(ckpt_path).startswith("registry:"):
            check_checkpoint_fits(self.model, read_checkpoint(str(ckpt_path)), str(ckpt_path))
        if self.subcommand == "fit":
            for logger in self.trainer.loggers:
                check_writable(logger.save_dir or self.trainer.default_root_dir)
            check_writable(self.trainer.default_root_dir)

    before_fit = before_validate = before_test = before_predict = _check_before_run

    @staticmethod
    def configure_optimizers(lightning_module: LightningModule, optimizer, lr_scheduler=None):
        """Lightning's default, except that ``WarmupCosineLR`` is sized to the Trainer's run and
        stepped at its own interval (every optimizer step, or every epoch)."""
        if isinstance(lr_scheduler, WarmupCosineLR):
            size_to_trainer(lr_scheduler, lightning_module.trainer)
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": lr_scheduler, "interval": lr_scheduler.interval}}
        return LightningCLI.configure_optimizers(lightning_module, optimizer, lr_scheduler)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate, test, predict, and ``sample`` (see ``SeqTrainer.sample``)."""
        return {**LightningCLI.subcommands(), "sample": {"model", "datamodule"}}


_NOISE = ("Does not validate against", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>")


def condense_parser_error(message: str) -> str:
    """jsonargparse's nested, multi-line error -> one line: the dotted key and the reason."""
    keys, reason, class_path = [], None, None
    for raw in message.splitlines():
        line = raw.strip().lstrip("-").strip()
        if not line or line.startswith(_NOISE):
            continue
        match = re.match(r'Parser key "([^"]+)":\s*(.*)', line)
        if match:
            keys.append(match.group(1))
            line = match.group(2)
        match = re.match(r"Problem with given class_path '([^']+)':\s*(.*)", line)
        if match:
            class_path, line = match.group(1), match.group(2)
        if line and reason is None:
            reason = line
    reason = re.sub(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", r"must be one of [\1], got '\2'", reason or "")
    text = f"{'.'.join(keys)}: {reason or message.strip()}" if keys else (reason or message.strip())
    if class_path:
        text += f" (in {class_path}; see `--{keys[0] if keys else 'model'}.help {class_path}`)"
    return text


def _roles() -> tuple[tuple[type, str], ...]:
    """The config section that builds each kind of object, most specific first."""
    from lightning.pytorch.loggers import Logger
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

    return ((Optimizer, "optimizer"), (LRScheduler, "lr_scheduler"), (ReduceLROnPlateau, "lr_scheduler"),
            (Logger, "trainer.logger"), (Callback, "trainer.callbacks"), (LightningDataModule, "data"),
            (LightningModule, "model"), (Trainer, "trainer"))


def _public_path(cls: type) -> str:
    """``torch.optim.Adam`` rather than ``torch.optim.adam.Adam``: the shortest module path,
    among those already imported, that exports the class."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None and getattr(module, cls.__qualname__, None) is cls:
            return f"{module.__name__}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _named_option(cls: type, message: str) -> str | None:
    """The argument of ``cls.__init__`` that ``message`` names first, if it names one."""
    import inspect

    try:
        params = [p.name for p in inspect.signature(cls.__init__).parameters.values()
                  if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        return None
    found = [(match.start(), p) for p in params
             if (match := re.search(rf"(?<![\w.]){re.escape(p)}(?!\w)", message))]
    return min(found)[1] if found else None


def describe_framework_error(error: BaseException) -> str:
    """A framework's error as one line: the config section whose object raised it (the
    innermost frame of its traceback whose ``self`` is an optimizer, scheduler, logger, callback,
    data module, model or Trainer), with the first argument of that class the message names as
    the option: ``trainer.max_epochs: `max_epochs` must be a non-negative integer or -1. You
    passed in -5.``. Otherwise (and for the Trainer when no option is named, since every error
    inside ``trainer.fit`` has a Trainer frame) the exception's class and the module that
    raised it."""
    frames, tb = [], error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    raised_in = frames[-1].f_globals.get("__name__", "?") if frames else "?"
    text = condense_parser_error(str(error)) if raised_in.startswith("jsonargparse") else str(error)
    message = " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__
    if len(message) > 600:
        message = message[:600] + " ..."
    roles = _roles()
    for frame in reversed(frames):
        obj = frame.f_locals.get("self")
        role = next((name for cls, name in roles if isinstance(obj, cls)), None)
        if role is None:
            continue
        option = _named_option(type(obj), message)
        if role == "trainer":  # every error inside trainer.fit has a Trainer frame: name an option or nothing
            if option is None:
                break
            return f"trainer.{option}: {message}"
        key = f"{role}.{option}" if option else role
        path = _public_path(type(obj))
        return f"{key}: {message} (in {path}; see `--{role}.help {path}`)"
    return f"{type(error).__name__}: {message} (raised in {raised_in})"


def show_framework_tracebacks() -> bool:
    """Python's development mode (``python -X dev``): framework errors keep their traceback."""
    return bool(sys.flags.dev_mode)


def main(args: list[str] | None = None, **kwargs) -> SeqCLI:
    """Run the CLI (``kwargs`` go to LightningCLI, e.g. ``trainer_defaults``). One line on
    stderr and exit code 2, without a traceback, for:

    * a UserError (ConfigError, TrainingDiverged) anywhere, at any time;
    * a config the parser rejects (an unknown key, a wrong type, a missing file);
    * any error a framework (Lightning, torch, torchmetrics, jsonargparse, ...: code outside
      this project) raises while the run is being built (``BuildBoundary``: up to the first
      batch): ``--trainer.max_epochs -5``, ``--optimizer.init_args.lr -1``, an unknown
      accelerator, a scheduler Lightning cannot drive. ``describe_framework_error`` names the
      config section (and option) it came from.

    Everything else keeps its traceback: an error raised by this project's own code that is
    not a UserError (a bug), and any error once the run is built (a crash inside a training
    step). Python's development mode (``python -X dev``) shows the traceback of a framework's
    error too (no variable of our own: ``SEQMODELS_COMPILED`` is the project's only one). Nothing
    is deleted on the way out: a run folder or checkpoint written before the error stays."""
    kwargs.setdefault("parser_kwargs", {"exit_on_error": False})
    build = BuildBoundary()
    try:
        return SeqCLI(args=args, trainer_class=SeqTrainer, build=build, **kwargs)
    except Exception as err:
        line = one_line_error(err, build)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def one_line_error(err: BaseException, build: BuildBoundary | None = None) -> str | None:
    """The line ``main`` prints for ``err`` (after ``error: ``), or None where the error keeps
    its traceback (see ``main``): a config the parser rejects, a UserError, or a framework's
    error while ``build`` is building (None: outside any run, e.g. before one is built)."""
    if isinstance(err, argparse.ArgumentError):
        return condense_parser_error(str(err))
    user_error = find_user_error(err)
    if user_error is not None:
        return str(user_error)
    framework_error = find_framework_error(err) if build is None or build.building else None
    if framework_error is None or show_framework_tracebacks():
        return None
    return describe_framework_error(framework_error)
