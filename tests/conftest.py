"""Shared test setup: W&B offline and never prompting, each test in its own folder."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# datasets' cache (text read through its text builder) in a folder of this test session, not
# the user's ~/.cache/huggingface; set before anything imports datasets, which reads it then.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="seqmodels-tests-hf-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)
# seqmodels' cache folder (impl auto's measured decisions, converted data) for the session,
# subprocesses included: every run of a test at the same shape takes the same backend, and the
# user's cache stays untouched. torch keeps its C++ extensions where it would have (it also reads
# XDG_CACHE_HOME): the loops are built once per machine, not once per test session.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch_extensions"))
os.environ["XDG_CACHE_HOME"] = os.path.join(os.environ["HF_DATASETS_CACHE"], "xdg-cache")
# Without a GPU the Triton kernels of impl triton (seqmodels/bptt/kernels.py) run on CPU tensors in
# Triton's interpreter; it must be on before they are first imported (triton.jit reads it then).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def fresh_user_env(home) -> dict:
    """The environment of a user with no W&B key or settings (WANDB_* unset, an empty HOME) for
    a subprocess, which still loads the C++ loops this machine has built (TORCH_EXTENSIONS_DIR,
    set above: not ~12 s of compiling them again under the new HOME)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), NETRC=str(Path(home) / "no-netrc"), PYTHONPATH=str(ROOT))
    return env


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch):
    """Run in an empty folder; afterwards finish the W&B run (Lightning never does) and reset
    wandb's process-wide state, so one test's mode (offline, disabled) never leaks into the next."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    import wandb

    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


@pytest.fixture
def two_threads():
    """torch (and the C++ loops' team) on 2 threads for the test, whatever the host's default."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def has_cxx_compiler() -> bool:
    """A C++ compiler torch.utils.cpp_extension would use ($CXX, else c++)."""
    import shutil

    return shutil.which(os.environ.get("CXX", "c++")) is not None


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA, ``cxx`` tests a C++ compiler: without one they are skipped, with
    the reason, not failed. With a compiler, a failed build fails them."""
    import torch

    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `python -m pytest -m gpu` on one)")
    no_cxx = pytest.mark.skip(reason="needs a C++ compiler for the fused BPTT loops (the reference is tested)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "cxx" in item.keywords and not has_cxx_compiler():
            item.add_marker(no_cxx)
