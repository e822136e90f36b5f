"""Regularizers inside the recurrence (recurrent dropout, zoneout of h and c, weight drop):
the equations against a loop written out here in float64, evaluation (off, or zoneout's
expectation), gradcheck, the hand-written BPTT's weight drop against autograd, what ``auto``
picks, and the one-line errors."""
from __future__ import annotations

import pytest
import torch

from seqmodels import RecurrentStack
from seqmodels.registry import CELLS
from seqmodels.errors import ConfigError
from seqmodels import backends
from tests.helpers.fake_cuda import FakeCuda
from tests.helpers import mark_slow

ALL = dict(recurrent_dropout=0.3, zoneout_h=0.2, zoneout_c=0.4, weight_drop=0.5)


def by_hand(stack: RecurrentStack, x: torch.Tensor, training: bool, seed: int = 7) -> torch.Tensor:
    """One LSTM layer with every regularizer, written out (RecurrentLayer's docstring), drawing
    its random numbers in the documented order: W's mask, r, d_h of every step, d_c of every step."""
    p = stack.regularizers
    cell = stack.layers[0].cell
    torch.manual_seed(seed)
    w_hh = cell.weight_hh
    B, T, _ = x.shape
    H = cell.hidden_size
    if training:
        w_hh = w_hh * (torch.empty_like(w_hh).bernoulli_(1 - p.weight_drop) / (1 - p.weight_drop))
        r = torch.empty(B, H, dtype=x.dtype).bernoulli_(1 - p.recurrent_dropout) / (1 - p.recurrent_dropout)
    else:
        r = torch.ones(B, H, dtype=x.dtype)
    if training:
        d_h_all = torch.bernoulli(torch.full((T, B, H), p.zoneout_h, dtype=x.dtype))
        d_c_all = torch.bernoulli(torch.full((T, B, H), p.zoneout_c, dtype=x.dtype))
    h = c = torch.zeros(B, H, dtype=x.dtype)
    out = []
    for t in range(T):
        z = x[:, t] @ cell.weight_ih.T + cell.bias_ih + (h * r) @ w_hh.T + cell.bias_hh
        i, f, g, o = z.chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if training:
            d_h, d_c = d_h_all[t], d_c_all[t]
        else:
            d_h, d_c = p.zoneout_h, p.zoneout_c
        h, c = d_h * h + (1 - d_h) * h_new, d_c * c + (1 - d_c) * c_new
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_the_lstm_with_every_regularizer_follows_its_equations(training):
    torch.manual_seed(0)
    stack = RecurrentStack("lstm", 3, 5, impl="autograd", **ALL).double().train(training)
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    torch.manual_seed(7)
    out, _ = stack(x)
    torch.testing.assert_close(out, by_hand(stack, x, training), rtol=1e-12, atol=1e-12)


def regularizers_of(cell: str) -> dict:
    """Every regularizer that applies to the cell (zoneout_c needs a cell state)."""
    return {k: v for k, v in ALL.items() if k != "zoneout_c" or "c" in CELLS[cell].state}


def check_evaluation(cell: str) -> None:
    """At evaluation the dropouts are off and zoneout is its expectation."""
    torch.manual_seed(0)
    plain = RecurrentStack(cell, 3, 5, num_layers=2, impl="autograd").eval()
    regs = dict(recurrent_dropout=0.3, weight_drop=0.5)
    dropped = RecurrentStack(cell, 3, 5, num_layers=2, impl="autograd", **regs).eval()
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 7, 3)
    torch.testing.assert_close(dropped(x)[0], plain(x)[0], rtol=0, atol=0)
    zoned = RecurrentStack(cell, 3, 5, num_layers=1, impl="autograd", zoneout_h=0.25).eval()
    zoned.load_state_dict({k: v for k, v in plain.state_dict().items() if k.endswith("_l0")})
    h = torch.zeros(2, 5)
    state = tuple(torch.zeros(2, 5) for _ in CELLS[cell].state)
    for t in range(7):
        new = zoned.layers[0].cell(x[:, t], state)
        h = 0.25 * state[0] + 0.75 * new[0]
        state = (h, *new[1:])
    torch.testing.assert_close(zoned(x)[0][:, -1], h)


def check_gradcheck_with_every_regularizer(cell: str) -> None:
    torch.manual_seed(0)
    regs = regularizers_of(cell)
    stack = RecurrentStack(cell, 3, 4, num_layers=2, impl="autograd", **regs).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    params = list(stack.parameters())

    def run(x, *weights):
        with torch.random.fork_rng():
            torch.manual_seed(3)  # the same masks on every call
            return stack(x)[0]

    assert torch.autograd.gradcheck(run, (x, *params))


def check_handwritten_equal_autograd(name: str, options: dict, regs: dict, dtype: torch.dtype, training: bool) -> None:
    """Every hand-written backward of the cell (on a CPU) with the same masks as autograd
    (``regularizer_masks`` draws them for both): outputs, final states and every gradient equal
    autograd's, with uneven lengths."""
    for impl in [b for b in ("cpp", "reference") if b in CELLS[name].layers]:
        check_pair(name, options, regs, dtype, training, impl)


def check_pair(name, options, regs, dtype, training, impl) -> None:
    torch.manual_seed(0)
    a = RecurrentStack(name, 3, 6, num_layers=2, impl="autograd", **options, **regs).to(dtype).train(training)
    b = RecurrentStack(name, 3, 6, num_layers=2, impl=impl, **options, **regs).to(dtype).train(training)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 5, 3, dtype=dtype)
    results = []
    for stack in (a, b):
        torch.manual_seed(11)
        out, state = stack(x, lengths=torch.tensor([5, 3, 1, 4]))
        (out.sum() + sum(s.square().sum() for s in state)).backward()
        results.append((out, state, [p.grad for p in stack.parameters()]))
    # float32: gradients are sums over every step and row of O(1) terms, so a small entry carries
    # an absolute rounding error of ~1e-6 that depends on the BLAS's order (1.4e-6 seen on an AVX-512
    # Xeon); torch's own float32 atol; a wrong formula is off by far more (float64 is the strict check)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    (out_a, state_a, grads_a), (out_b, state_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, **tol)
    for sa, sb in zip(state_a, state_b):
        torch.testing.assert_close(sa, sb, **tol)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, **tol)
    if training and "weight_drop" in regs:
        assert grads_a[1].eq(0).any(), "dropped entries of W_hh get no gradient"


@pytest.mark.parametrize("cell", list(CELLS))
def test_at_evaluation_dropouts_are_off_and_zoneout_is_its_expectation(cell):
    check_evaluation(cell)


@pytest.mark.parametrize("cell", mark_slow(list(CELLS), "rru", "gru"))  # 2-5 s each
def test_gradcheck_through_every_regularizer(cell):
    check_gradcheck_with_every_regularizer(cell)


# every registered cell and variant with a hand-written backward, each regularizer alone and all at once
CASES = [pytest.param(name, variant, regs, id="-".join([name, *map(str, variant.values()), reg]))
         for name, kind in CELLS.items() if kind.layers for variant in kind.all_variants()
         for reg, regs in [*((k, {k: v}) for k, v in regularizers_of(name).items()), ("all", regularizers_of(name))]]


@pytest.mark.parametrize("name, variant, regs", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_regularizers_under_the_handwritten_backward_equal_autograd(name, variant, regs, dtype, training):
    check_handwritten_equal_autograd(name, variant, regs, dtype, training)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "lstm_peephole"])
def test_gradcheck_of_the_reference_backward_with_recurrent_dropout_and_zoneout(cell):
    """The hand-written backward itself (reference Functions) in float64, fixed masks, lengths."""
    from seqmodels.bptt import reference

    gen = torch.Generator().manual_seed(0)
    T, B, I, H = 4, 3, 2, 3
    G = 4 if cell.startswith("lstm") else 1
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, h0, c0 = rand(T, B, I), rand(B, H), rand(B, H)
    w_ih, w_hh, b_ih, b_hh = rand(G * H, I), rand(G * H, H), rand(G * H), rand(G * H)
    mask = reference.step_mask(torch.tensor([4, 2, 3]), T, x)
    r = torch.bernoulli(torch.full((B, H), 0.7, dtype=torch.float64), generator=gen) / 0.7
    d_h = torch.bernoulli(torch.full((T, B, H), 0.3, dtype=torch.float64), generator=gen)
    d_c = torch.bernoulli(torch.full((T, B, H), 0.4, dtype=torch.float64), generator=gen)
    if cell == "rnn":
        fn = lambda x, h0, a, b, c, d: reference.RNNReference.apply(x, h0, a, b, c, d, mask, "tanh", r, d_h)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, h0, w_ih, w_hh, b_ih, b_hh))
    else:
        peep = (rand(H), rand(H), rand(H)) if cell == "lstm_peephole" else (None,) * 3

        def fn(x, h0, c0, a, b, c, d, *p):
            p = p if p else (None,) * 3
            return reference.LSTMReference.apply(x, h0, c0, a, b, c, d, *p, mask, r, d_h, d_c)

        assert torch.autograd.gradcheck(fn, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, *[p for p in peep if p is not None]))


def test_auto_never_picks_torch_with_a_regularizer(monkeypatch):
    cpu, cuda = torch.zeros(2, 3, 2), FakeCuda(2, 3, 2)
    for name in CELLS:
        cell = RecurrentStack(name, 2, 4).layers[0].cell
        for x in (cpu, cuda):
            assert "torch" not in backends.candidates(CELLS[name], cell, x, ("weight_drop",))
    assert backends.candidates(CELLS["lstm"], RecurrentStack("lstm", 2, 4).layers[0].cell, cpu, ("zoneout_h",)) == ["cpp"]
    assert backends.candidates(CELLS["gru"], RecurrentStack("gru", 2, 4).layers[0].cell, cpu,
                               ("recurrent_dropout",)) == ["reference", "autograd"]
    for regs in (dict(weight_drop=0.3), dict(zoneout_h=0.1), dict(recurrent_dropout=0.2, zoneout_c=0.1)):
        stack = RecurrentStack("lstm", 2, 64, **regs)
        monkeypatch.setattr(stack, "_forward_torch", lambda *a: pytest.fail("torch's op ran"))
        stack(torch.randn(16, 3, 2))[0].sum().backward()
        with torch.no_grad():
            stack.eval()(torch.randn(16, 3, 2))


@pytest.mark.parametrize("kwargs, message", [
    (dict(cell="lstm", zoneout_h=1.0), "zoneout_h must be in [0, 1) (a probability; 0 turns it off), got 1.0"),
    (dict(cell="rnn", recurrent_dropout=-0.1), "recurrent_dropout must be in [0, 1)"),
    (dict(cell="gru", zoneout_c=0.2), "zoneout_c: 0.2 does not apply to cell: gru, which has no cell state c"),
    (dict(cell="lstm", impl="torch", recurrent_dropout=0.2),
     "impl: torch cannot apply recurrent_dropout (torch's fused ops have no such option); use impl: auto, autograd, "
     "cpp, reference, triton"),
    (dict(cell="gru", impl="torch", zoneout_h=0.2), "(torch's fused ops have no such option); use impl: auto, autograd, "
     "reference, triton$"),
    (dict(cell="lstm", impl="native", weight_drop=0.2), "impl: torch cannot apply weight_drop"),
])
def test_bad_regularizers_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError) as excinfo:
        RecurrentStack(input_size=2, hidden_size=4, **kwargs)
    text = str(excinfo.value)
    assert "\n" not in text
    assert text.endswith(message[:-1]) if message.endswith("$") else message in text


def test_a_task_names_the_config_key():
    from seqmodels.tasks import SumsRegressor
    from seqmodels.tasks.base import NetworkConfig

    with pytest.raises(ConfigError, match=r"^model\.network\.weight_drop must be in \[0, 1\)"):
        SumsRegressor(NetworkConfig(cell="lstm", weight_drop=1.5))


@pytest.mark.cxx
@pytest.mark.parametrize("cell", ["rnn", "lstm", "lstm_peephole"])
@pytest.mark.parametrize("B, H", [(41, 100), (12, 120)], ids=["by_rows", "by_units"])
def test_the_cpp_loops_apply_every_regularizer_when_threads_share_a_step(cell, B, H, two_threads):
    """Recurrent dropout, zoneout and weight drop in the C++ loops with the step shared by rows
    and by units (tests/test_bptt.py has the split), uneven lengths, against autograd."""
    from seqmodels import fused

    assert fused.loops() is not None
    regs = regularizers_of(cell.split("_")[0])
    options = dict(peephole=True) if cell == "lstm_peephole" else {}
    torch.manual_seed(0)
    a = RecurrentStack(cell.split("_")[0], 9, H, impl="autograd", **options, **regs)
    b = RecurrentStack(cell.split("_")[0], 9, H, impl="cpp", **options, **regs)
    b.load_state_dict(a.state_dict())
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, 9, 9, generator=gen)
    lengths = torch.randint(0, 10, (B,), generator=gen)
    weights = torch.randn(B, 9, H, generator=gen)
    results = []
    for stack in (a, b):
        torch.manual_seed(11)
        out, state = stack(x, lengths=lengths)
        ((out * weights).sum() + sum(s.square().sum() for s in state)).backward()
        results.append((out, [p.grad for p in stack.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for ga, gb in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)
