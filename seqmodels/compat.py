"""Every private torch, Lightning and torchdata internal this project relies on, in one place,
with the versions they were read against. Importing this module checks those versions (from
the installed packages' metadata: it imports neither Lightning nor torchdata, so the cells stay
light) and warns, in one line, about an untested one.

torch
    ``torch._VF.<rnn_tanh | rnn_relu | lstm | gru>``: the fused RNN ops behind torch.nn.RNN /
    LSTM / GRU (oneDNN on CPU, cuDNN on GPU), called on the stack's own parameters.
    ``torch._cudnn_rnn_flatten_weight``: what ``torch.nn.LSTM.flatten_parameters`` calls. It
    copies the weights into one buffer in cuDNN's layout and makes each parameter a view of it;
    cuDNN then runs on the parameters themselves. Without it every call warns "RNN module
    weights are not part of single contiguous chunk of memory" and copies all weights
    (aten/src/ATen/native/cudnn/RNN.cpp, ``try_get_weight_buf``). ``nn.Module._apply`` is
    overridden to flatten again after ``.to()`` / ``.cuda()`` / ``.half()``, as
    ``torch.nn.RNNBase`` does (``FlattenOnApply``).
    ``torch.ops.mkldnn._linear_pointwise``: oneDNN's GEMM (the hand-written BPTT's big CPU
    GEMMs on AVX-512, bptt/fast.py).
    ``torch.utils.cpp_extension._get_build_directory``: where ``load`` builds an extension
    (to say, before a first build, that one is coming).
Lightning
    ``fit_loop.epoch_loop._batches_that_stepped``: the logging step (exact resume).
    ``ModelCheckpoint._should_skip_saving_checkpoint`` / ``_save_last_checkpoint`` /
    ``_monitor_candidates``: saving ``last.ckpt`` at a moment of our choosing.
    ``LightningCLI._parse_ckpt_path``: replaced, so the config stays the source of truth.
    ``WeightAveraging._average_model``: the ``AveragedModel`` holding ``EMAWeights``' average
    (its buffers follow the model's; samples during training come from it).
    ``WandbLogger._wandb_init``: the keyword arguments its ``experiment`` passes to
    ``wandb.init``. Lightning always puts ``anonymous=None`` there, which wandb >= 0.19
    answers with "The anonymous setting has no effect" on every run; dropped when unset.
torchdata
    ``StatefulDataLoader.state_dict()["_num_yielded"]``: batches handed out this epoch.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
from torch import Tensor

# (lowest tested, first untested) per package
TESTED = {"torch": ("2.2", "2.14"), "lightning": ("2.4", "2.7"), "torchdata": ("0.8", "0.12")}


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def installed_versions() -> dict[str, str]:
    """The installed versions of the checked packages, read from their metadata (no import)."""
    from importlib import metadata

    versions = {"torch": torch.__version__}
    for name in ("lightning", "torchdata"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass  # not installed: nothing of it will be used
    return versions


def check_versions(installed: dict[str, str] | None = None) -> None:
    """One warning per installed package outside the versions whose internals this module was
    checked against: the project may still work, and this says where to look if it does not."""
    for name, version in (installed or installed_versions()).items():
        low, high = TESTED[name]
        if not _version(low) <= _version(version) < _version(high):
            warnings.warn(f"seqmodels uses private internals of {name} checked with versions >= {low} and < {high}, "
                          f"but {name} {version} is installed: if something breaks, install a tested version "
                          f"(pip install '{name}>={low},<{high}'); seqmodels/compat.py lists what to check",
                          stacklevel=2)


check_versions()


# ---- torch: the fused RNN ops -----------------------------------------------------------------
def native_rnn_op(name: str) -> Callable:
    """torch's fused op for a cell: ``rnn_tanh``, ``rnn_relu``, ``lstm`` or ``gru``."""
    return getattr(torch._VF, name)


# ---- torch: cuDNN's weight layout -------------------------------------------------------------
def cudnn_can_flatten(weights: list[Tensor]) -> bool:
    """The conditions of ``torch.nn.RNNBase.flatten_parameters``: every weight on one CUDA
    device in one cuDNN dtype (float16/32/64), none aliasing another, cuDNN enabled."""
    if not weights or not all(isinstance(w, Tensor) for w in weights):
        return False
    first = weights[0]
    if not first.is_cuda or not hasattr(torch, "_cudnn_rnn_flatten_weight"):
        return False
    if any(w.dtype != first.dtype or w.device != first.device or not torch.backends.cudnn.is_acceptable(w)
           for w in weights):
        return False
    return len({w.data_ptr() for w in weights}) == len(weights)


def cudnn_is_flat(weights: list[Tensor]) -> bool:
    """True when the weights already share one storage (flattened, and not moved since)."""
    base = weights[0].untyped_storage().data_ptr()
    return all(w.untyped_storage().data_ptr() == base for w in weights)


class FlattenOnApply(torch.nn.Module):
    """A module mixin: after every ``.to()``, ``.cuda()``, ``.half()`` (``nn.Module._apply``,
    which gives the parameters new storages) call ``self.flatten_parameters()`` again."""

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self.flatten_parameters()
        return result


def cudnn_flatten_(weights: list[Tensor], per_layer: int, input_size: int, mode: str, hidden_size: int,
                   num_layers: int, bidirectional: bool = False) -> None:
    """Make ``weights`` (``per_layer`` tensors a layer and direction, torch.nn.RNN's order) views
    of one buffer in cuDNN's layout, in place, keeping their values and identities. ``mode``:
    cuDNN's name of the cell (``RNN_TANH``, ``RNN_RELU``, ``LSTM``, ``GRU``)."""
    from torch.backends.cudnn import rnn

    with torch.cuda.device_of(weights[0]), torch.no_grad():
        if torch._use_cudnn_rnn_flatten_weight():
            torch._cudnn_rnn_flatten_weight(weights, per_layer, input_size, rnn.get_cudnn_mode(mode),
                                            hidden_size, 0, num_layers, True, bidirectional)


# ---- torch: oneDNN's GEMMs on the CPU ---------------------------------------------------------
def has_onednn_linear() -> bool:
    """oneDNN's linear op is there (a CPU build of torch with mkldnn)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weightᵀ + bias`` through oneDNN's GEMM."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# ---- torch: C++ extensions ------------------------------------------------------------------
def extension_is_built(name: str) -> bool:
    """Whether ``cpp_extension.load(name=...)`` finds a library already built (a rebuild after a
    change to the sources is not foreseen: it only says whether this is the first build)."""
    from torch.utils import cpp_extension

    return os.path.isfile(os.path.join(cpp_extension._get_build_directory(name, False), f"{name}.so"))


# ---- Lightning -----------------------------------------------------------------------------
def set_logging_step(trainer, step: int) -> None:
    """The step Lightning logs metrics at (it counts batches that stepped the optimizer)."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = step


def save_last_checkpoint(callback, trainer) -> None:
    """``last.ckpt`` of a ModelCheckpoint now, unless this step is saved already (or
    Lightning says not to save now, e.g. while sanity checking)."""
    if not callback._should_skip_saving_checkpoint(trainer):
        callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def averaged_module(callback):
    """The module inside a ``WeightAveraging`` callback's ``AveragedModel`` (None before ``setup``)."""
    average = callback._average_model
    return None if average is None else average.module


def wandb_init_kwargs(logger) -> dict:
    """The dict of keyword arguments a Lightning ``WandbLogger`` will give ``wandb.init``."""
    return logger._wandb_init


class ConfigFirstCLI:
    """A LightningCLI mixin: Lightning would overwrite the model's config with a checkpoint's
    hyperparameters (``_parse_ckpt_path``). Here the config stays the source of truth; the
    CLI checks that a checkpoint fits it and refuses one that does not, in one line."""

    def _parse_ckpt_path(self) -> None:
        pass


# ---- torchdata -----------------------------------------------------------------------------
def batches_yielded(loader_state: dict) -> int:
    """Batches a StatefulDataLoader handed out this epoch, from its ``state_dict()``."""
    return loader_state.get("_num_yielded", 0)
