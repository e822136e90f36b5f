"""The one decision of how a recurrence runs (seqmodels.backends), with CUDA faked where the rule
is about a GPU: auto never runs the experimental Triton kernels, measuring runs only the
candidates, and an opt-in that cannot run says so in one line and goes on with a proven path."""
from __future__ import annotations

import warnings

import pytest
import torch

from seqmodels import RecurrentStack, backends
from seqmodels.bptt import gpu
from seqmodels.registry import CELLS
from tests.helpers.fake_cuda import FakeCuda

PROVEN_ON_CUDA = {"torch", "reference", "autograd"}


def cell_of(name: str, **options):
    return RecurrentStack(name, 3, 8, **options).layers[0].cell


@pytest.mark.parametrize("name, options", [(n, v) for n, k in CELLS.items() for v in k.all_variants()])
@pytest.mark.parametrize("regularizers", [(), ("zoneout_h",)])
def test_auto_on_a_gpu_measures_only_proven_backends(name, options, regularizers):
    seen = []

    def measure(candidates, first):
        seen.append(candidates)
        return backends.Choice(first, "measured")

    x = FakeCuda(4, 5, 3)
    choice = backends.choose("auto", CELLS[name], cell_of(name, **options), x, regularizers, measure)
    offered = seen[0] if seen else [choice.backend]
    assert set(offered) <= PROVEN_ON_CUDA and "triton" not in offered
    if regularizers or CELLS[name].torch_twin({**CELLS[name].options, **options}) is None:
        assert offered == ["reference", "autograd"][-len(offered):]  # peepholes, regularizers: proven paths
    else:
        assert offered == ["torch"]  # cuDNN, nothing to measure


def test_triton_opted_in_without_a_gpu_or_triton_says_one_line_and_runs_a_proven_path(monkeypatch):
    monkeypatch.setattr(gpu, "interpreted", lambda: False)
    backends._notice.cache_clear()
    stack = RecurrentStack("lstm", 3, 8, impl="triton")
    with pytest.warns(UserWarning, match=r"impl: triton cannot run here \(the tensors are on cpu, not a CUDA GPU\); "
                                         r"running (torch|cpp)") as record:
        stack(torch.randn(2, 4, 3))
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert next(iter(stack.backends.values())).backend in ("torch", "cpp")
    # on a GPU without Triton: the same, with auto's choice there (cuDNN)
    monkeypatch.setattr(gpu, "_triton_missing", lambda: "Triton is not installed; `pip install triton`")
    lstm = CELLS["lstm"]
    with pytest.warns(UserWarning, match="Triton is not installed"):
        choice = backends.choose("triton", lstm, cell_of("lstm"), FakeCuda(2, 4, 3), ())
    assert (choice.backend, choice.source) == ("torch", "fallback")
    backends._notice.cache_clear()


def test_triton_runs_only_when_asked(monkeypatch):
    """Where the kernels could run (faked: a capable GPU), auto still never picks them."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    lstm, cell = CELLS["lstm"], cell_of("lstm", peephole=True)
    assert gpu.why_not(FakeCuda(2, 4, 3), 4, 32) is None
    assert backends.choose("triton", lstm, cell, FakeCuda(2, 4, 3), ()).backend == "triton"
    assert backends.choose("auto", lstm, cell, FakeCuda(2, 4, 3), ()).backend == "reference"


def test_measuring_runs_nothing_but_the_candidates(monkeypatch):
    ran = []
    stack = RecurrentStack("rnn", 3, 8)
    run_backend = stack.run_backend
    monkeypatch.setattr(stack, "run_backend", lambda b, *a: ran.append(b) or run_backend(b, *a))
    stack(torch.randn(2, 4, 3))[0].sum().backward()
    assert set(ran) == set(backends.candidates(stack.kind, stack.layers[0].cell, torch.zeros(1), ())) == {"torch", "cpp"}


def test_a_cpp_stack_on_a_gpu_runs_the_reference():
    choice = backends.choose("cpp", CELLS["rnn"], cell_of("rnn"), FakeCuda(2, 4, 3), ())
    assert (choice.backend, choice.source) == ("reference", "fallback")


def test_each_decision_is_said_once(capsys):
    stack = RecurrentStack("gru", 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            stack(torch.randn(2, 4, 3))[0].sum().backward()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("seqmodels: gru")]
    assert lines == ["seqmodels: gru 1x8 at train B≤2 T≤4 on " + next(iter(stack.backends)).split("|")[0] +
                     " runs on torch (torch's fused op; impl: auto, rule: the only candidate)"]


@pytest.mark.slow
def test_the_cells_benchmark_measures_a_cell_without_a_torch_twin_against_the_lstm():
    """benchmarks/cells.py --cells rru: its rows are torch.nn.LSTM of the same size (nn) and
    autograd, the RRU's only backend; it says so instead of naming a faster path."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cells.py"), "--cells", "rru", "--size", "2", "3",
                          "4", "5", "--repeats", "1", "--warmup", "0", "--no-memory", "--json"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    rows = json.loads(out.strip().splitlines()[-1])["results"]
    assert [(r["cell"], r["impl"]) for r in rows] == [("rru", "nn"), ("rru", "autograd")]
    assert all(r["train_tokens_per_s"] > 0 for r in rows)
    assert "autograd only (no hand-written backward)" in out
