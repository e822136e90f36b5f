"""The Triton kernels of impl triton on CUDA (experimental) (seqmodels/bptt/kernels.py, launched by gpu.py),
against the reference BPTT (itself gradchecked in test_bptt.py).

Without a GPU they run on CPU tensors in Triton's interpreter (tests/conftest.py turns it on),
which runs a grid's programs one after another: the formulas, the masks, the regularizers, the
carried state, multi-program grids stepped one launch per step, the persistent loop with one
program, the barrier's timeout and the limits are all checked here on a CPU. What only a GPU
shows (the persistent grid barrier across real concurrent programs, TF32, bfloat16 on tensor
cores) runs with ``-m gpu``. The interpreter is slow: keep these shapes small.

Tolerances: float64 (interpreter only) 1e-12: the same formulas, other summation order;
float32 with exact float32 dots 1e-5; bfloat16 operands, accumulated in float32 with a float32
cell state, 5e-2 relative (norm of the difference over the norm) to the float32 reference on
the same bfloat16-rounded inputs: the activations and δz are stored with 8-bit mantissas, and
f' = 1 − h̃² of a saturated unit keeps few of them (measured: up to 3e-2 on the gradients).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from seqmodels.bptt import gpu, reference
from seqmodels.recurrent import RecurrentStack

pytestmark = pytest.mark.triton
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED:
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 8):
        # compiling for a GPU works with older ones (3.5 and 3.7 checked); their interpreters do not
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run the kernels on a CPU; "
                    "pip install 'triton>=3.8'", allow_module_level=True)
CPU = pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="CUDA present: the kernels run "
                                                   "compiled, on the cuda variants (-m gpu)"))
CUDA = pytest.param("cuda", marks=pytest.mark.gpu)
CELLS = ("rnn_tanh", "rnn_relu", "lstm", "lstm_peephole", "gru")
# (plan, B, H): one program stepping through all T in one launch; a 2 x 3 grid of programs, one
# launch per step, with batch rows and hidden units past the blocks' edges (B=20, H=40 in 16s)
PLANS = {"persistent": (gpu.Plan(16, 16, 16, persistent=True), 5, 7),
         "per_step": (gpu.Plan(16, 16, 16, persistent=False), 20, 40)}


@pytest.fixture
def exact_float32():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def layer_inputs(cell: str, B: int, H: int, T: int = 6, I: int = 3, dtype=torch.float64, device="cpu",
                 options: bool = True, seed: int = 0) -> dict:
    """Weights, input, state and (options) lengths with 0 and T, recurrent dropout r and zoneout
    masks for one layer; gradients wanted of every floating input."""
    gen = torch.Generator().manual_seed(seed)
    G = {"lstm": 4 * H, "gru": 3 * H}.get(cell.split("_")[0], H)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device).requires_grad_()

    d = dict(x=rand(T, B, I), h0=rand(B, H), weight_ih=rand(G, I, scale=0.5), weight_hh=rand(G, H, scale=0.5 / H ** 0.5 * 2),
             bias_ih=rand(G), bias_hh=rand(G))
    if cell.startswith("lstm"):
        d["c0"] = rand(B, H)
        d["peep"] = tuple(rand(H) for _ in range(3)) if cell == "lstm_peephole" else (None,) * 3
    d["lengths"] = d["r"] = d["d_h"] = d["d_c"] = None
    if options:
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        lengths[0], lengths[-1] = T, 0
        keep = 0.7
        d["lengths"] = lengths.to(device)
        d["r"] = (torch.bernoulli(torch.full((B, H), keep), generator=gen) / keep).to(dtype).to(device)
        d["d_h"] = torch.bernoulli(torch.full((T, B, H), 0.3), generator=gen).to(dtype).to(device)
        if cell.startswith("lstm"):
            d["d_c"] = torch.bernoulli(torch.full((T, B, H), 0.3), generator=gen).to(dtype).to(device)
    return d


def run(cell: str, d: dict, use_triton: bool, upcast: bool = False):
    """Outputs, and the gradients of a random function of them w.r.t. every floating input."""
    inputs = {k: v for k, v in d.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    peep = d.get("peep", ())
    inputs.update({f"p{k}": p for k, p in enumerate(peep) if p is not None})
    if upcast:  # the reference in float32 on the same (rounded) values
        inputs = {k: v.detach().float().requires_grad_() for k, v in inputs.items()}
    get = lambda k: inputs.get(k, d[k])  # noqa: E731
    mask = reference.step_mask(d["lengths"], d["x"].shape[0], get("x"))
    cast = (lambda t: None if t is None else t.float()) if upcast else (lambda t: t)
    if cell == "gru":
        weights = [get(k) for k in ("x", "h0", "weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        if use_triton:
            out = gpu.GRUTriton.apply(*weights, d["lengths"], True, d["r"], d["d_h"])
        else:
            out = reference.GRUReference.apply(*weights, mask, cast(d["r"]), cast(d["d_h"]))
    elif cell.startswith("rnn"):
        nl = cell.split("_")[1]
        weights = [get(k) for k in ("x", "h0", "weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        if use_triton:
            out = gpu.RNNTriton.apply(*weights, d["lengths"], nl, True, d["r"], d["d_h"])
        else:
            out = reference.RNNReference.apply(*weights, mask, nl, cast(d["r"]), cast(d["d_h"]))
    else:
        weights = [get(k) for k in ("x", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        peeps = [inputs.get(f"p{k}") for k in range(3)]
        if use_triton:
            out = gpu.LSTMTriton.apply(*weights, *peeps, d["lengths"], True, d["r"], d["d_h"], d["d_c"])
        else:
            out = reference.LSTMReference.apply(*weights, *peeps, mask, cast(d["r"]), cast(d["d_h"]), cast(d["d_c"]))
    gen = torch.Generator().manual_seed(99)
    weights_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in out]
    loss = sum((o.double() * w).sum() for o, w in zip(out, weights_out))
    names = list(inputs)
    grads = torch.autograd.grad(loss, [inputs[k] for k in names])
    return [o.detach() for o in out], dict(zip(names, grads))


def assert_agree(cell: str, d: dict, rtol: float, atol: float, upcast: bool = False) -> None:
    out_t, grads_t = run(cell, d, use_triton=True)
    out_r, grads_r = run(cell, d, use_triton=False, upcast=upcast)
    for a, b in zip(out_t, out_r):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol, atol=atol)
    assert grads_t.keys() == grads_r.keys()
    for k in grads_r:
        torch.testing.assert_close(grads_t[k].to(grads_r[k].dtype), grads_r[k], rtol=rtol, atol=atol, msg=k)


def with_plan(monkeypatch, plan_: gpu.Plan) -> None:
    monkeypatch.setattr(gpu, "plan", lambda B, H, sms: plan_)


# the quick subset: every cell as one persistent program with every option; the per-step grid
# (1.5-2.6 s a cell in the interpreter) and the plain cells with ``slow``
FLOAT64_CASES = [pytest.param(cell, mode, options, marks=[] if options and mode == "persistent" else [pytest.mark.slow],
                              id=f"{cell}-{mode}-{'options' if options else 'plain'}")
    for cell in CELLS for mode in sorted(PLANS) for options in (True, False)]


@pytest.mark.parametrize("cell, mode, options", FLOAT64_CASES)
def test_kernels_equal_the_reference_in_float64(cell, mode, options, monkeypatch):
    """Outputs, final states and the gradients of every input (state and weights included), with
    uneven lengths (one of T, one of 0), recurrent dropout and zoneout, or none of them."""
    if not INTERPRETED:
        pytest.skip("float64 runs only in the interpreter (on a GPU it takes the reference loop)")
    plan_, B, H = PLANS[mode]
    with_plan(monkeypatch, plan_)
    assert_agree(cell, layer_inputs(cell, B, H, options=options), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("cell", CELLS)
def test_kernels_equal_the_reference_in_float32(cell, device, exact_float32, monkeypatch):
    if device == "cpu":
        with_plan(monkeypatch, PLANS["persistent"][0])
    B, H = (5, 7) if device == "cpu" else (20, 40)
    d = layer_inputs(cell, B, H, dtype=torch.float32, device=device)
    assert_agree(cell, d, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm_peephole", "gru"])
def test_bfloat16_operands_accumulate_in_float32(cell, device, monkeypatch):
    """bfloat16 inputs and weights: the GEMMs multiply bfloat16 and sum in float32, the gate
    math and the LSTM's cell state are float32, h and δz are stored as bfloat16."""
    if device == "cpu":
        with_plan(monkeypatch, PLANS["persistent"][0])
    B, H = (5, 7) if device == "cpu" else (20, 40)
    d = layer_inputs(cell, B, H, dtype=torch.bfloat16, device=device)
    out, grads = run(cell, d, use_triton=True)
    assert all(o.dtype == torch.bfloat16 for o in out)
    out_r, grads_r = run(cell, d, use_triton=False, upcast=True)
    for a, b in list(zip(out, out_r)) + [(grads[k], grads_r[k]) for k in grads_r]:
        assert float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)) < 5e-2


@pytest.mark.parametrize("cell", ["lstm_peephole", "gru"])
@pytest.mark.slow
def test_persistent_launch_that_times_out_reruns_one_step_per_launch(cell, monkeypatch):
    """Two programs in one persistent launch: the interpreter runs them one after the other, so
    the first waits at the grid barrier for a program that has not started. The wait gives up,
    the host sees the flag, says so once and reruns forward and backward step by step: the
    results are exact, never the half-synchronised ones."""
    monkeypatch.setattr(gpu, "SPIN", 4)
    with_plan(monkeypatch, gpu.Plan(16, 16, 16, persistent=True))
    gpu._step_notice.cache_clear()
    d = layer_inputs(cell, 5, 20)  # H=20: two column blocks
    with pytest.warns(UserWarning, match="grid barrier timed out"):
        assert_agree(cell, d, rtol=1e-12, atol=1e-12)


def test_second_backward_through_the_same_forward_fails_loudly(monkeypatch):
    with_plan(monkeypatch, PLANS["persistent"][0])
    d = layer_inputs("lstm", 5, 7, options=False)
    out = gpu.LSTMTriton.apply(d["x"], d["h0"], d["c0"], d["weight_ih"], d["weight_hh"], d["bias_ih"], d["bias_hh"],
                               None, None, None, None, True)
    loss = out[0].sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot backward twice"):
        loss.backward()


def test_gradients_equal_finite_differences(monkeypatch):
    """The kernels' own gradients against central differences of their own forward, in
    float64: the directional derivative along random directions through every input at once
    (gradcheck's fast mode by hand: gradcheck itself runs several backwards per forward,
    which the in-place backward refuses)."""
    if not INTERPRETED:
        pytest.skip("float64 runs only in the interpreter")
    with_plan(monkeypatch, PLANS["persistent"][0])
    d = layer_inputs("lstm_peephole", 3, 5, T=4, I=2)
    names = ["x", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    leaves = [d[k] for k in names] + list(d["peep"])
    gen = torch.Generator().manual_seed(5)
    w = [torch.randn(4, 3, 5, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen, dtype=torch.float64),
         torch.randn(3, 5, generator=gen, dtype=torch.float64)]

    def loss(values):
        out = gpu.LSTMTriton.apply(*values, d["lengths"], True, d["r"], d["d_h"], d["d_c"])
        return sum((o * wo).sum() for o, wo in zip(out, w))

    grads = torch.autograd.grad(loss(leaves), leaves)
    eps = 1e-6
    for _ in range(3):
        v = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in leaves]
        with torch.no_grad():
            up = loss([t + eps * vi for t, vi in zip(leaves, v)])
            down = loss([t - eps * vi for t, vi in zip(leaves, v)])
        numeric = float((up - down) / (2 * eps))
        analytic = float(sum((g * vi).sum() for g, vi in zip(grads, v)))
        assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic))


SHARED_PER_BLOCK = {90: 227 * 1024, 80: 163 * 1024}  # the most shared memory one program may ask for
COMPILED = [(90, "float32", "none"), (90, "bfloat16", "none"), (90, "float32", "all"), (80, "bfloat16", "all")]


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    """Every kernel compiled for each of COMPILED (arch, dtype, options), in one subprocess
    (tests/helpers/compile_kernels.py: the launch gpu.plan makes at (256, 1024) on 132 SMs)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root)
    run = subprocess.run([sys.executable, str(root / "tests" / "helpers" / "compile_kernels.py"),
                          *[f"{a}:{d}:{o}" for a, d, o in COMPILED]], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.parametrize("arch, dtype, options", COMPILED)
def test_kernels_compile_for_the_gpu_without_one(compiled, arch, dtype, options):
    """What the interpreter cannot show: the kernels compile to a cubin for sm_90 (H100/H200)
    and sm_80 (A100) with Triton's own ptxas, their GEMMs on the tensor cores (mma), and the
    grid barrier as a release add and acquire loads in global memory, the add done by thread 0
    only (one arrival per program), within the GPU's shared memory per program. The plain
    cells, as the benchmarks and most runs launch them at (256, 1024), spill no register."""
    results = [r for r in compiled if (r["arch"], r["dtype"], r["options"]) == (arch, dtype, options)]
    assert [r["kernel"] for r in results] == [f"{c}_{d}" for c in ("rnn", "lstm", "gru") for d in ("forward", "backward")]
    for r in results:
        assert r["cubin_bytes"] > 0 and r["mma"] and r["release_add"] and r["acquire_load"] and r["arrive_once"], r
        assert options == "all" or r["stack_bytes"] == 0, f"{r['kernel']} spills registers: {r}"
        assert r["shared_bytes"] <= SHARED_PER_BLOCK[arch], r


def test_plan_fits_every_program_on_the_gpu_or_steps():
    """A persistent plan has at most one program per multiprocessor and covers B and H with
    blocks of 16 or more (tl.dot's minimum); past that, one launch per step."""
    for B in (1, 16, 32, 64, 100, 256, 1024):
        for H in (1, 8, 128, 256, 512, 1024, 4096):
            for sms in (1, 8, 132):
                p = gpu.plan(B, H, sms)
                nb, nh = p.grid(B, H)
                assert nb * p.BB >= B and nh * p.BH >= H and min(p.BB, p.BH, p.BK) >= 16
                assert (nb * nh <= sms) == p.persistent or (nb * nh > sms and not p.persistent)
                assert p.warps == gpu.warps_for(p.BB, p.BH) and (p.persistent or p.BB * p.BH <= 2048)
                if p.persistent:
                    assert nb * nh <= sms and p in gpu.persistent_plans(B, H, sms)
                for q in gpu.persistent_plans(B, H, sms):  # what benchmarks/triton_plans.py times
                    assert q.persistent and q.grid(B, H)[0] * q.grid(B, H)[1] <= sms and q.warps in (4, 8)
    assert gpu.plan(64, 512, 132).grid(64, 512)[0] * gpu.plan(64, 512, 132).grid(64, 512)[1] > 64  # uses the GPU
    assert gpu.plan(256, 1024, 132) == gpu.Plan(128, 16, 32, persistent=True, warps=8)  # no spill (compile test)


def test_the_plan_sweep_lists_the_plans_it_would_time(monkeypatch, capsys):
    """benchmarks/triton_plans.py --list (no GPU needed): every size, the default plan among
    the timed ones."""
    from benchmarks import triton_plans

    monkeypatch.setattr(sys, "argv", ["triton_plans.py", "--list", "--top", "4"])
    triton_plans.main()
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if line.startswith("B=")]
    assert len(heads) == 3 and all("4 plans timed" in h and "(persistent)" in h for h in heads)
    assert out.count("  BB=") == 12
    default = gpu.plan(64, 512, 132)
    assert f"default BB={default.BB} BH={default.BH} warps=4" in heads[0]


def test_why_the_kernels_do_not_run_is_one_line(monkeypatch):
    ok = gpu.why_not_on((9, 0), torch.float32, 64, 2048)
    assert ok is None
    reasons = [gpu.why_not_on((7, 5), torch.float32, 64, 2048), gpu.why_not_on((9, 0), torch.float64, 64, 2048),
               gpu.why_not_on((9, 0), torch.float32, 2**20, 2**12)]
    assert "compute capability 7.5" in reasons[0] and "float64" in reasons[1] and "limit" in reasons[2]
    monkeypatch.setattr(gpu, "interpreted", lambda: False)
    reasons.append(gpu.why_not(torch.zeros(1), 1, 4))
    assert reasons[-1] == "the tensors are on cpu, not a CUDA GPU"
    monkeypatch.setattr(gpu, "interpreted", lambda: True)
    monkeypatch.setenv("SEQMODELS_COMPILED", "0")
    reasons.append(gpu.why_not(torch.zeros(1), 1, 4))
    assert reasons[-1] == "SEQMODELS_COMPILED=0 turns compiled code off"
    monkeypatch.delenv("SEQMODELS_COMPILED")
    monkeypatch.setattr(gpu, "_triton_missing", lambda: "Triton is not installed; `pip install triton`")
    reasons.append(gpu.why_not(torch.zeros(1), 1, 4))
    assert all(r and "\n" not in r for r in reasons)


def test_a_layer_over_the_limit_runs_a_proven_path_after_one_notice(monkeypatch):
    """Whatever gpu.why_not refuses runs auto's proven choice instead, with one notice, and
    gives its results, not the kernels' limits."""
    from seqmodels import backends

    calls = []
    monkeypatch.setattr(gpu, "why_not", lambda x, b, g: "a step of batch 4 x 24 gate units is over the limit")
    monkeypatch.setattr(gpu.LSTMTriton, "apply", lambda *a: calls.append(a))
    backends._notice.cache_clear()
    torch.manual_seed(0)
    stack = RecurrentStack("lstm", 3, 6, impl="triton", peephole=True)
    x = torch.randn(4, 5, 3)
    with pytest.warns(UserWarning, match="impl: triton cannot run here.*over the limit"):
        out, _ = stack(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stack(x)  # the notice once
    ref = RecurrentStack("lstm", 3, 6, impl="autograd", peephole=True)
    ref.load_state_dict(stack.state_dict())
    torch.testing.assert_close(out, ref(x)[0], rtol=1e-5, atol=1e-6)
    assert not calls
    backends._notice.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("cell", ["rnn", "lstm", "lstm_peephole", "gru"])
def test_the_stack_takes_the_kernels_on_cuda(cell, exact_float32, monkeypatch):
    """RecurrentStack(impl="triton") on a GPU runs the Triton Functions, with a persistent launch
    at a size of the speed targets, and agrees with autograd."""
    name = cell.split("_")[0]
    options = dict(peephole=True) if cell == "lstm_peephole" else {}
    used = []
    function = {"rnn": gpu.RNNTriton, "lstm": gpu.LSTMTriton, "gru": gpu.GRUTriton}[name]
    original = function.forward
    monkeypatch.setattr(function, "forward", staticmethod(lambda *a: used.append(1) or original(*a)))
    torch.manual_seed(0)
    a = RecurrentStack(name, 64, 512, impl="autograd", **options).cuda()
    b = RecurrentStack(name, 64, 512, impl="triton", **options).cuda()
    b.load_state_dict(a.state_dict())
    assert gpu.plan(64, 512, gpu._multiprocessors(torch.zeros(1, device="cuda"))).persistent
    x = torch.randn(64, 100, 64, device="cuda")
    lengths = torch.randint(1, 101, (64,))
    for stack in (a, b):
        out, state = stack(x, lengths=lengths)
        (out.square().mean() + sum(s.square().mean() for s in state)).backward()
    assert used
    torch.testing.assert_close(b(x, lengths=lengths)[0], a(x, lengths=lengths)[0], rtol=1e-4, atol=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-3, atol=1e-6)
