"""The hand-written BPTT (seqmodels/bptt/: reference and fast path) against autograd, torch's RNN/LSTM and a
closed-form scalar example. CPU, tiny sizes, a few seconds in all."""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seqmodels import bptt, fused
from seqmodels.cells import LSTMCell
from seqmodels.recurrent import RecurrentStack

VARIANTS = {
    "rnn_tanh": dict(cell="rnn", nonlinearity="tanh"),
    "rnn_relu": dict(cell="rnn", nonlinearity="relu"),
    "lstm": dict(cell="lstm"),
    "lstm_peephole": dict(cell="lstm", peephole=True),
}


HANDWRITTEN = {"impl": "cpp"}  # the hand-written backward a test runs (the ``loops`` fixture sets it)


def make_stack(variant: str, input_size: int, hidden_size: int, num_layers: int = 2,
               impl: str | None = None, dtype=torch.float32, seed: int = 0) -> RecurrentStack:
    """A stack with random weights; peephole vectors random too (they start at 0)."""
    torch.manual_seed(seed)
    stack = RecurrentStack(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers,
                           impl=impl or HANDWRITTEN["impl"], **VARIANTS[variant]).to(dtype)
    with torch.no_grad():
        for name, p in stack.named_parameters():
            if "weight_c" in name:
                p.uniform_(-0.5, 0.5)
    return stack


def random_state(stack: RecurrentStack, batch: int, dtype, gen: torch.Generator):
    shape = (stack.num_layers, batch, stack.hidden_size)
    return tuple(torch.randn(shape, dtype=dtype, generator=gen) * 0.5 for _ in stack.kind.state)


def as_tuple(state):
    """torch.nn's convention (h alone, or (h, c)) -> ours (always a tuple)."""
    return state if isinstance(state, tuple) else (state,)


def as_torch(state: tuple):
    return state if len(state) > 1 else state[0]


def loss_and_grads(stack: RecurrentStack, impl: str, x, state, lengths, weights):
    """A loss that touches every output and the final state; gradients w.r.t. x, the initial
    state and every parameter."""
    stack.impl = impl
    x = x.detach().requires_grad_()
    state = tuple(s.detach().requires_grad_() for s in as_tuple(state))
    out, final = stack(x, state, lengths)
    loss = (out * weights).sum() + sum((f ** 2).sum() for f in as_tuple(final))
    scale = (out * weights).abs().sum() + sum((f ** 2).sum() for f in as_tuple(final))
    inputs = [x, *state, *stack.parameters()]
    return (loss.detach(), scale.detach()), torch.autograd.grad(loss, inputs)


def assert_same_loss(loss, ref, tol=1e-5):
    """Equal up to float32 rounding: tolerance relative to the sum of the terms' magnitudes."""
    (value, _), (ref_value, scale) = loss, ref
    assert abs(value.item() - ref_value.item()) <= tol * scale.item(), (value, ref_value)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---- the peephole LSTM -------------------------------------------------------------
def test_peephole_lstm_with_zero_peepholes_equals_plain_lstm():
    torch.manual_seed(0)
    plain, peep = LSTMCell(3, 4), LSTMCell(3, 4, peephole=True)
    peep.load_state_dict({**plain.state_dict(), **{n: torch.zeros(4) for n in
                                                  ("weight_ci", "weight_cf", "weight_co")}})
    # float64, to a few ulps: bit-equality depends on which vectorized kernel path a
    # (strided or contiguous) tensor takes, which differs between CPUs
    plain, peep = plain.double(), peep.double()
    x, h, c = (torch.randn(5, n, dtype=torch.float64) for n in (3, 4, 4))
    for a, b in zip(plain(x, (h, c)), peep(x, (h, c))):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
    # and through the stack: bptt with zero peepholes equals torch.nn.LSTM's kernel
    stack = make_stack("lstm_peephole", 3, 4, impl="cpp")
    native = make_stack("lstm", 3, 4, impl="torch")
    with torch.no_grad():
        for name, p in stack.named_parameters():
            p.copy_(torch.zeros_like(p) if "weight_c" in name else native.get_parameter(name))
    xs = torch.randn(2, 6, 3)
    torch.testing.assert_close(stack(xs)[0], native(xs)[0], rtol=1e-5, atol=1e-6)
    # non-zero peepholes do change the result (the test above could fail)
    with torch.no_grad():
        stack.layers[0].cell.weight_cf.fill_(0.5)
    assert not torch.allclose(stack(xs)[0], native(xs)[0], atol=1e-4)


# ---- gradcheck in float64 ------------------------------------------------------------
@pytest.fixture(params=[pytest.param("cpp", marks=pytest.mark.cxx), "reference"])
def loops(request, monkeypatch):
    """Both implementations of the hand-written BPTT on a CPU: the C++ loops (they must build
    here, a failed build fails the test) and the plain-torch reference."""
    if request.param == "cpp":
        assert fused.loops() is not None, "the fused C++ loops did not build (see the warning)"
    monkeypatch.setitem(HANDWRITTEN, "impl", request.param)
    return request.param


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradcheck_bptt(variant, loops):
    """Masks (uneven lengths), a non-zero initial state (its gradient checked) and 2 layers."""
    stack = make_stack(variant, input_size=2, hidden_size=3, num_layers=2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    B, T = 3, 4
    lengths = torch.tensor([4, 1, 3])
    x = torch.randn(B, T, 2, dtype=torch.float64, generator=gen)
    state = as_tuple(random_state(stack, B, torch.float64, gen))
    names = [n for n, _ in stack.named_parameters()]
    params = [p.detach().clone() for p in stack.parameters()]

    def f(x, *rest):
        st, ps = rest[: len(state)], rest[len(state):]
        out, final = functional_call(stack, dict(zip(names, ps)),
                                     (x, tuple(st), lengths))
        return (out, *as_tuple(final))

    inputs = [t.requires_grad_() for t in (x, *state, *params)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_gru_bptt():
    """The GRU's hand-written BPTT (its reference; the GPU kernels are checked against it in
    test_triton_kernels.py): masks, a non-zero initial state, 2 layers, as above."""
    torch.manual_seed(0)
    stack = RecurrentStack("gru", 2, 3, num_layers=2, impl="reference").double()
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([4, 1, 3])
    x = torch.randn(3, 4, 2, dtype=torch.float64, generator=gen)
    h0 = torch.randn(2, 3, 3, dtype=torch.float64, generator=gen) * 0.5
    names = [n for n, _ in stack.named_parameters()]

    def f(x, h0, *params):
        out, (h,) = functional_call(stack, dict(zip(names, params)), (x, (h0,), lengths))
        return out, h

    inputs = [t.detach().clone().requires_grad_() for t in (x, h0, *stack.parameters())]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# ---- float32: bptt vs autograd vs native -------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("padded", [False, True])
def test_impls_agree_float32(variant, padded, loops):
    stack = make_stack(variant, input_size=5, hidden_size=16, num_layers=2)
    gen = torch.Generator().manual_seed(2)
    B, T = 6, 20
    x = torch.randn(B, T, 5, generator=gen)
    state = random_state(stack, B, torch.float32, gen)
    lengths = torch.tensor([20, 3, 17, 1, 20, 9]) if padded else None
    weights = torch.randn(B, T, 16, generator=gen)
    ref_loss, ref_grads = loss_and_grads(stack, "autograd", x, state, lengths, weights)
    impls = [HANDWRITTEN["impl"]] + ([] if stack.peephole else ["torch"])
    for impl in impls:
        loss, grads = loss_and_grads(stack, impl, x, state, lengths, weights)
        assert_same_loss(loss, ref_loss)
        names = ["x"] + [f"state{i}" for i in range(len(as_tuple(state)))] + \
            [n for n, _ in stack.named_parameters()]
        for name, g, r in zip(names, grads, ref_grads):
            assert rel_err(g, r) < 1e-5, (impl, name, rel_err(g, r))


@pytest.mark.cxx
@pytest.mark.parametrize("variant,hidden", [("rnn_tanh", 512), ("lstm", 256), ("lstm_peephole", 256)])
@pytest.mark.parametrize("avx512", [False, True])
def test_impls_agree_float32_large_weights(variant, hidden, avx512, monkeypatch):
    """The fast path's big GEMMs (input projection, dX, dW) take oneDNN on AVX-512 CPUs and
    MKL otherwise: both paths run on any x86 CPU, and both agree with autograd."""
    monkeypatch.setattr(bptt.fast, "_AVX512", avx512)
    stack = make_stack(variant, input_size=7, hidden_size=hidden, num_layers=1)
    gen = torch.Generator().manual_seed(4)
    B, T = 3, 12
    x = torch.randn(B, T, 7, generator=gen)
    state = random_state(stack, B, torch.float32, gen)
    lengths = torch.tensor([12, 5, 9])
    weights = torch.randn(B, T, hidden, generator=gen)
    ref_loss, ref_grads = loss_and_grads(stack, "autograd", x, state, lengths, weights)
    loss, grads = loss_and_grads(stack, HANDWRITTEN["impl"], x, state, lengths, weights)
    assert_same_loss(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


@pytest.mark.cxx
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("B, H", [(41, 100), (12, 120)], ids=["by_rows", "by_units"])
def test_fused_loops_split_across_threads(variant, B, H, two_threads):
    """The C++ loops share each step among torch's threads (a step big enough for it), against
    autograd with uneven lengths: by rows when every thread gets >= 8 sequences and W_hh fits in
    a core's cache (41 rows: 20 + 21), else by units (12 rows, 120 units: 48 + 72)."""
    assert fused.loops() is not None
    stack = make_stack(variant, input_size=9, hidden_size=H, num_layers=1)
    gen = torch.Generator().manual_seed(5)
    T = 9
    x = torch.randn(B, T, 9, generator=gen)
    state = random_state(stack, B, torch.float32, gen)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    weights = torch.randn(B, T, H, generator=gen)
    ref_loss, ref_grads = loss_and_grads(stack, "autograd", x, state, lengths, weights)
    loss, grads = loss_and_grads(stack, HANDWRITTEN["impl"], x, state, lengths, weights)
    assert_same_loss(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize("variant", ["rnn_tanh", "lstm_peephole"])
def test_bptt_keeps_nan_and_saturates(variant, loops):
    """Both loops: huge pre-activations saturate exactly as torch's (σ -> 0 or 1, tanh -> ±1)
    and a NaN input stays NaN in the outputs (the divergence guard relies on it)."""
    stack = make_stack(variant, input_size=3, hidden_size=8, num_layers=1)
    x = torch.tensor([[[1e4, -1e4, 50.0]] * 3, [[float("nan"), 0.0, 0.0]] * 3])
    with torch.no_grad():
        out = stack(x)[0]
        stack.impl = "autograd"
        ref = stack(x)[0]
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
    assert torch.allclose(out[0], ref[0], atol=1e-6)


@pytest.mark.cxx
def test_fused_tanh_and_sigmoid_match_torch_over_a_wide_range():
    """The C++ loops' own exp (a polynomial, vectorized) against torch's tanh and sigmoid, on
    4001 pre-activations in [-30, 30]: an RNN step h = tanh(w x) with x = 1, W_hh = 0 and an
    LSTM step whose gates see the same values (i = σ(z), c = i·g, h = σ(z)·tanh(c))."""
    assert fused.loops() is not None
    z = torch.linspace(-30, 30, 4001)
    rnn = make_stack("rnn_tanh", input_size=1, hidden_size=z.numel(), num_layers=1)
    lstm = make_stack("lstm", input_size=1, hidden_size=z.numel(), num_layers=1)
    with torch.no_grad():
        for stack, gates in ((rnn, 1), (lstm, 4)):
            cell = stack.layers[0].cell
            cell.weight_ih.copy_(z.repeat(gates).unsqueeze(1))
            for p in (cell.weight_hh, cell.bias_ih, cell.bias_hh):
                p.zero_()
        x = torch.ones(1, 1, 1)
        h_rnn = rnn(x)[0].flatten()
        h_lstm, (_, c_lstm) = lstm(x)
    torch.testing.assert_close(h_rnn, torch.tanh(z), rtol=0, atol=3e-7)
    c_ref = torch.sigmoid(z) * torch.tanh(z)
    torch.testing.assert_close(c_lstm.flatten(), c_ref, rtol=0, atol=3e-7)
    torch.testing.assert_close(h_lstm.flatten(), torch.sigmoid(z) * torch.tanh(c_ref),
                               rtol=0, atol=3e-7)


@pytest.mark.cxx
@pytest.mark.slow
def test_fused_loops_leave_torch_rng_alone():
    """Their first call in a process checks the BLAS against at::mm; that check must not draw
    from torch's RNG (it would shift dropout masks: a resumed run would not match). A fresh
    process, since the check runs once per process."""
    code = """
import torch
from seqmodels.recurrent import RecurrentStack
torch.manual_seed(0)
stack = RecurrentStack("lstm", 3, 4, impl="cpp")
for dtype in (torch.float32, torch.float64):
    s = stack.to(dtype)
    before = torch.get_rng_state()
    s(torch.ones(2, 5, 3, dtype=dtype))[0].sum().backward()
    assert torch.equal(before, torch.get_rng_state()), dtype
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.cxx
def test_fused_build_without_openmp_retries_for_one_thread(monkeypatch):
    """A compiler without OpenMP (clang on macOS): the loops are built again without it (one
    thread per step), silently."""
    import warnings

    from torch.utils import cpp_extension

    assert fused.loops() is not None  # the real build, loaded: the retry below only records
    attempts = []

    def no_openmp(**kwargs):
        attempts.append((kwargs["extra_cflags"], kwargs["extra_ldflags"]))
        if "-fopenmp" in kwargs["extra_cflags"]:
            raise RuntimeError("Error building extension\nclang: error: unsupported option '-fopenmp'")

    monkeypatch.setattr(cpp_extension, "load", no_openmp)
    fused._build.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert fused.loops() is not None
        assert [("-fopenmp" in c, "-fopenmp-simd" in c, ld) for c, ld in attempts] == [
            (True, False, ["-fopenmp"]), (False, True, [])]
    finally:
        fused._build.cache_clear()


def test_first_build_says_so_in_one_line(monkeypatch, capsys):
    """Before the first compile (no library built yet) one line says what is coming; a cached
    build says nothing."""
    from seqmodels import compat
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: None)  # the build itself is not the point here
    for built, expected in ((False, 1), (True, 0)):
        monkeypatch.setattr(compat, "extension_is_built", lambda name, b=built: b)
        fused._build.cache_clear()
        try:
            fused.loops()
        finally:
            fused._build.cache_clear()
        lines = [line for line in capsys.readouterr().err.splitlines() if "compiling the C++ BPTT loops" in line]
        assert len(lines) == expected and (not lines or "once" in lines[0])


def test_fused_build_failure_falls_back_with_one_warning(monkeypatch):
    """No compiler or no ninja: one warning naming the cause, then the plain-torch reference."""
    from torch.utils import cpp_extension

    def broken(**kwargs):
        raise RuntimeError("Error building extension\nfoo.cpp:1:1: error: no compiler here")

    monkeypatch.setattr(cpp_extension, "load", broken)
    fused._build.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no compiler here.*plain-torch reference"):
            assert fused.loops() is None
        stack = make_stack("lstm", input_size=3, hidden_size=4, num_layers=1)
        gen = torch.Generator().manual_seed(6)
        x, weights = torch.randn(2, 5, 3, generator=gen), torch.randn(2, 5, 4, generator=gen)
        state = random_state(stack, 2, torch.float32, gen)
        ref_loss, ref_grads = loss_and_grads(stack, "autograd", x, state, None, weights)
        loss, grads = loss_and_grads(stack, HANDWRITTEN["impl"], x, state, None, weights)
        assert_same_loss(loss, ref_loss)
        assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads))
    finally:
        fused._build.cache_clear()


@pytest.mark.parametrize("variant", ["rnn_relu", "lstm_peephole"])
def test_zero_length_sequence_keeps_initial_state(variant, loops):
    """A sequence of length 0 (torch's packing refuses it): state and gradient pass through."""
    stack = make_stack(variant, input_size=3, hidden_size=5, num_layers=2)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, 3, generator=gen)
    state = random_state(stack, 3, torch.float32, gen)
    lengths = torch.tensor([6, 0, 2])
    weights = torch.randn(3, 6, 5, generator=gen)
    ref_loss, ref_grads = loss_and_grads(stack, "autograd", x, state, lengths, weights)
    loss, grads = loss_and_grads(stack, HANDWRITTEN["impl"], x, state, lengths, weights)
    assert_same_loss(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5
    out, final = stack(x, state, lengths)
    assert out[1].abs().max().item() == 0.0
    for f, s0 in zip(as_tuple(final), as_tuple(state)):
        torch.testing.assert_close(f[:, 1], s0[:, 1], rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["rnn_tanh", "lstm", "lstm_peephole"])
def test_reused_buffers_never_leak_between_calls(variant, monkeypatch):
    """Buffers go back to a pool and are handed out again: two graphs alive at once, an
    inference pass in between and a backward with retain_graph must all stay exact."""
    from seqmodels import bptt
    monkeypatch.setattr(bptt.fast._POOL, "min_bytes", 0)  # pool every buffer, however small
    bptt.clear_buffer_pool()
    stack = make_stack(variant, input_size=3, hidden_size=8, num_layers=2)
    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(4, 7, 3, generator=gen) for _ in range(3)]
    lengths = torch.tensor([7, 3, 5, 7])
    weights = torch.randn(4, 7, 8, generator=gen)

    def grads_autograd(x):
        stack.impl = "autograd"
        stack.zero_grad()
        (stack(x, None, lengths)[0] * weights).sum().backward()
        return [p.grad.clone() for p in stack.parameters()]

    expected = [grads_autograd(x) for x in xs[:2]]
    stack.impl = "cpp"
    losses = [(stack(x, None, lengths)[0] * weights).sum() for x in xs[:2]]  # two live graphs
    with torch.no_grad():
        stack(xs[2], None, lengths)  # takes buffers from the pool and gives them back
    for loss, exp in zip(reversed(losses), reversed(expected)):
        for _ in range(2):  # retain_graph: the saved buffers must still be intact
            stack.zero_grad()
            loss.backward(retain_graph=True)
            for p, e in zip(stack.parameters(), exp):
                assert rel_err(p.grad, e) < 1e-5
            stack(xs[2], None, lengths)  # a forward with a graph, dropped at once
    bptt.clear_buffer_pool()


@pytest.mark.parametrize("variant", ["rnn_tanh", "lstm"])
def test_buffers_made_under_inference_mode_are_not_reused_outside_it(variant, monkeypatch):
    """Lightning tests and predicts under torch.inference_mode, whose buffers are inference
    tensors that nothing may write in place outside it: a pass with gradients, or under
    no_grad, after one under inference_mode (as a script evaluating after ``trainer.test``)
    gets other buffers, and the same outputs."""
    from seqmodels import bptt
    monkeypatch.setattr(bptt.fast._POOL, "min_bytes", 0)  # pool every buffer, however small
    bptt.clear_buffer_pool()
    stack = make_stack(variant, input_size=3, hidden_size=8, num_layers=2)
    stack.impl = "cpp"
    x = torch.randn(4, 7, 3, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = stack(x)[0]
    bptt.clear_buffer_pool()  # from here, the pool holds only what inference_mode gave back
    with torch.inference_mode():
        stack(x)
        torch.testing.assert_close(stack(x)[0], expected, rtol=0, atol=0)  # its own buffers, reused
    with torch.no_grad():
        torch.testing.assert_close(stack(x)[0], expected, rtol=0, atol=0)
    stack(x)[0].sum().backward()
    bptt.clear_buffer_pool()


def graph_size(t: torch.Tensor) -> int:
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo.extend(f for f, _ in fn.next_functions)
    return len(seen)


@pytest.mark.parametrize("variant", ["rnn_tanh", "lstm_peephole"])
def test_bptt_records_no_per_step_graph(variant):
    """One Function node per layer: the graph does not grow with T (autograd's does)."""
    sizes = {}
    for impl in ("cpp", "reference", "autograd"):
        stack = make_stack(variant, 3, 4, num_layers=2, impl=impl)
        sizes[impl] = [graph_size(stack(torch.randn(2, T, 3))[0]) for T in (5, 50)]
    assert sizes["cpp"][0] == sizes["cpp"][1] < 20 and sizes["reference"][0] == sizes["reference"][1] < 20
    assert sizes["autograd"][1] > sizes["autograd"][0]


# ---- padded batches vs torch on a PackedSequence ------------------------------------
@pytest.mark.parametrize("variant", ["rnn_tanh", "rnn_relu", "lstm"])
@pytest.mark.parametrize("impl", ["autograd", "cpp", "reference", "torch", "auto"])
def test_padded_batch_matches_packed_torch(variant, impl):
    stack = make_stack(variant, input_size=4, hidden_size=8, num_layers=2, impl=impl)
    kw = VARIANTS[variant]
    if kw["cell"] == "lstm":
        ref = torch.nn.LSTM(4, 8, num_layers=2, batch_first=True)
    else:
        ref = torch.nn.RNN(4, 8, num_layers=2, batch_first=True, nonlinearity=kw["nonlinearity"])
    ref.load_state_dict(stack.torch_state_dict())
    gen = torch.Generator().manual_seed(3)
    B, T = 5, 9
    lengths = torch.tensor([9, 2, 5, 1, 7])
    x = torch.randn(B, T, 4, generator=gen)
    state = random_state(stack, B, torch.float32, gen)
    out, final = stack(x, state, lengths)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    ref_out, ref_final = ref(packed, as_torch(state))
    ref_out, _ = pad_packed_sequence(ref_out, batch_first=True, total_length=T)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for b, n in enumerate(lengths.tolist()):
        if n < T:
            assert out[b, n:].abs().max().item() == 0.0  # zeros past the end
    for s, r in zip(as_tuple(final), as_tuple(ref_final)):
        torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-6)


# ---- the scalar worked example ----------------------------------------------------
def test_scalar_rnn_worked_example():
    """5 steps of h_t = tanh(w_hh h_{t-1} + w_hx x_t + b_h), ŷ = w_yh h_5 + b_y,
    L = ½(ŷ - y)²: the sum-over-paths gradients in plain floats equal autograd and bptt."""
    w_hh, w_hx, w_yh, b_h, b_y = 0.8, -0.6, 1.3, 0.1, -0.2
    xs, y, h0 = [0.5, -1.0, 0.25, 0.8, -0.3], 0.7, 0.4

    hs = [h0]
    for x in xs:
        hs.append(math.tanh(w_hh * hs[-1] + w_hx * x + b_h))
    y_hat = w_yh * hs[5] + b_y
    e = y_hat - y

    def through(k: int) -> float:
        """∂h_5/∂z_k = (Π_{j=k+1..5} w_hh (1 - h_j²)) (1 - h_k²)."""
        prod = 1.0 - hs[k] ** 2
        for j in range(k + 1, 6):
            prod *= w_hh * (1.0 - hs[j] ** 2)
        return prod

    closed = {
        "w_hh": sum(e * w_yh * through(k) * hs[k - 1] for k in range(1, 6)),
        "w_hx": sum(e * w_yh * through(k) * xs[k - 1] for k in range(1, 6)),
        "b_h": sum(e * w_yh * through(k) for k in range(1, 6)),
        "w_yh": e * hs[5],
        "b_y": e,
        "h0": e * w_yh * w_hh * through(1),  # ∂h_5/∂h_0 = Π_{j=1..5} w_hh (1 - h_j²)
    }
    loss = 0.5 * e * e

    # autograd on scalar tensors
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in
         dict(w_hh=w_hh, w_hx=w_hx, w_yh=w_yh, b_h=b_h, b_y=b_y, h0=h0).items()}
    h = p["h0"]
    for x in xs:
        h = torch.tanh(p["w_hh"] * h + p["w_hx"] * x + p["b_h"])
    l_ag = 0.5 * (p["w_yh"] * h + p["b_y"] - y) ** 2
    l_ag.backward()
    assert l_ag.item() == pytest.approx(loss, rel=1e-12)
    for k, v in closed.items():
        assert p[k].grad.item() == pytest.approx(v, rel=1e-10, abs=1e-12), k

    # the bptt impl through a 1-unit RNN stack
    stack = RecurrentStack("rnn", 1, 1, impl="cpp").double()
    cell = stack.layers[0].cell
    with torch.no_grad():
        cell.weight_hh.fill_(w_hh), cell.weight_ih.fill_(w_hx)
        cell.bias_ih.fill_(b_h), cell.bias_hh.zero_()
    w_yh_t = torch.tensor(w_yh, dtype=torch.float64, requires_grad=True)
    b_y_t = torch.tensor(b_y, dtype=torch.float64, requires_grad=True)
    h0_t = torch.full((1, 1, 1), h0, dtype=torch.float64, requires_grad=True)
    out, (h5,) = stack(torch.tensor(xs, dtype=torch.float64).view(1, 5, 1), (h0_t,))
    l_bptt = 0.5 * (w_yh_t * out[0, -1, 0] + b_y_t - y) ** 2
    l_bptt.backward()
    assert h5.item() == pytest.approx(hs[5], rel=1e-12)
    got = {"w_hh": cell.weight_hh.grad.item(), "w_hx": cell.weight_ih.grad.item(),
           "b_h": cell.bias_ih.grad.item(), "w_yh": w_yh_t.grad.item(), "b_y": b_y_t.grad.item(),
           "h0": h0_t.grad.item()}
    for k, v in closed.items():
        assert got[k] == pytest.approx(v, rel=1e-10, abs=1e-12), k


# ---- autocast ---------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["rnn_tanh", "lstm_peephole"])
def test_bptt_under_bf16_autocast_runs_in_float32(variant):
    stack = make_stack(variant, input_size=4, hidden_size=8, num_layers=2)
    x = torch.randn(3, 6, 4).bfloat16().requires_grad_()
    lengths = torch.tensor([6, 2, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = stack(x, None, lengths)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    # the same as a float32 run on the bf16-rounded input: nothing ran in bf16 inside
    grads = [p.grad.clone() for p in stack.parameters()]
    stack.zero_grad()
    x32 = x.detach().float().requires_grad_()
    out32, _ = stack(x32, None, lengths)
    out32.sum().backward()
    torch.testing.assert_close(out, out32, rtol=1e-6, atol=1e-6)
    for g, p in zip(grads, stack.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x32.grad.bfloat16())
