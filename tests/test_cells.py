"""The generic checks of every cell, run over the registry (``seqmodels.registry.CELLS``): equal
to its torch twin in float64 (both ways of loading weights), every backend equal to autograd in
float64 and float32 (outputs, final states, every gradient), gradcheck, the state API. A new cell
gets all of them from its registry entry alone: ``test_a_toy_cell_gets_every_check`` registers
one that exists only in this file."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from seqmodels import GRUCell, LSTMCell, RecurrentStack, RNNCell, RRUCell, backends
from seqmodels.errors import ConfigError
from seqmodels.registry import CELLS, CellType
from tests.helpers import mark_slow

B, T, I, H = 4, 7, 5, 6
LENGTHS = torch.tensor([7, 3, 5, 1])


def cases(with_twin: bool = False) -> list:
    """(cell name, options) for every registered cell and each of its variants."""
    return [pytest.param(name, variant, id=name + "".join(f"-{k}={v}" for k, v in variant.items()))
            for name, kind in CELLS.items() for variant in kind.all_variants()
            if not with_twin or kind.torch_twin({**kind.options, **variant}) is not None]


def stack_of(name: str, variant: dict, impl: str = "autograd", num_layers: int = 2, seed: int = 0,
             dtype=torch.float64, sizes: tuple[int, int] = (I, H)) -> RecurrentStack:
    """A stack with random weights; zero-initialised parameters (peepholes) random too."""
    torch.manual_seed(seed)
    stack = RecurrentStack(name, *sizes, num_layers, impl=impl, **variant).to(dtype)
    with torch.no_grad():
        for p in stack.parameters():
            if not p.any():
                p.uniform_(-0.5, 0.5)
    return stack


def cpu_backends(stack: RecurrentStack) -> list[str]:
    """Every impl that runs this cell on a CPU (triton runs on CUDA; tests/test_triton_kernels.py)."""
    return [b for b in backends.runnable(stack.kind, stack.layers[0].cell) if b != "triton"]


def random_state(name: str, num_layers: int, dtype=torch.float64) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(num_layers, B, H, dtype=dtype) for _ in CELLS[name].state)


def as_torch(state: tuple):
    """torch.nn's convention: h alone, or (h, c)."""
    return state if len(state) > 1 else state[0]


def twin(name: str, variant: dict, num_layers: int) -> nn.Module:
    kind = CELLS[name]
    module, kwargs = kind.torch_twin({**kind.options, **variant})
    return module(I, H, num_layers, batch_first=True, **kwargs).double()


def loss_and_grads(stack: RecurrentStack, impl: str, x, state, lengths):
    """A loss that touches every output and the final state; its gradients w.r.t. x, the
    initial state and every parameter."""
    stack.impl = impl
    x = x.detach().requires_grad_()
    state = tuple(s.detach().requires_grad_() for s in state)
    out, final = stack(x, state, lengths)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * weights).sum() + sum((f ** 2).sum() for f in final)
    return out, final, torch.autograd.grad(loss, [x, *state, *stack.parameters()])


# ---- the generic checks: each takes a registered cell and its options ----------------------
def check_twin_outputs(name: str, variant: dict, num_layers: int) -> None:
    """The torch twin's weights loaded into every backend give the twin's outputs and states,
    and our weights exported give our outputs in the twin."""
    ref = twin(name, variant, num_layers)
    stack = stack_of(name, variant, num_layers=num_layers)
    x = torch.randn(B, T, I, dtype=torch.float64)
    for impl in cpu_backends(stack):
        stack.impl = impl
        stack.load_torch_state_dict(ref.state_dict())
        for state in (None, random_state(name, num_layers)):
            out_ref, state_ref = ref(x, None if state is None else as_torch(state))
            out, final = stack(x, state)
            assert isinstance(final, tuple) and len(final) == len(CELLS[name].state)
            torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=0, msg=impl)
            for a, b in zip(final, state_ref if isinstance(state_ref, tuple) else (state_ref,)):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=impl)
    ours = stack_of(name, variant, num_layers=num_layers, seed=1)
    ref.load_state_dict(ours.torch_state_dict())
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-10, rtol=0)


def check_backends_agree(name: str, variant: dict, dtype: torch.dtype) -> None:
    """Every backend against autograd, with uneven lengths and a non-zero initial state:
    outputs, final states and every gradient (float64 to 1e-10, float32 to 1e-5 relative)."""
    stack = stack_of(name, variant, dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, I, generator=gen).to(dtype)
    state = tuple(s.to(dtype) for s in random_state(name, 2))
    want = loss_and_grads(stack, "autograd", x, state, LENGTHS)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for impl in cpu_backends(stack):
        got = loss_and_grads(stack, impl, x, state, LENGTHS)
        for a, b in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]]):
            assert (a - b).norm() <= tol * max(b.norm(), 1.0), (impl, dtype)


def check_gradcheck(name: str, variant: dict) -> None:
    """gradcheck in float64 through the stack (2 layers, lengths, initial state) for every backend
    whose backward is the project's (torch's own op is torch's to check; ``auto`` is one of these)."""
    stack = stack_of(name, variant, sizes=(2, 3))  # small: gradcheck perturbs every entry
    x = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
    state = tuple(torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True) for _ in CELLS[name].state)
    params = list(stack.parameters())
    for impl in [b for b in cpu_backends(stack) if b not in ("auto", "torch")]:
        stack.impl = impl

        def fn(x, *rest):
            with torch.nn.utils.stateless._reparametrize_module(
                    stack, dict(zip([n for n, _ in stack.named_parameters()], rest[len(state):]))):
                out, final = stack(x, tuple(rest[:len(state)]), torch.tensor([4, 2]))
            return (out, *final)

        assert torch.autograd.gradcheck(fn, (x, *state, *[p.detach().requires_grad_() for p in params])), impl


def check_state_api(name: str, variant: dict) -> None:
    """torch's shapes: output (B, T, H), a tuple state of (num_layers, B, H); the last output is
    the top layer's final h; the state carries over between calls."""
    stack = stack_of(name, variant, num_layers=3, dtype=torch.float32)
    x = torch.randn(B, T, I)
    out, state = stack(x)
    assert out.shape == (B, T, H) and isinstance(state, tuple) and len(state) == len(CELLS[name].state)
    assert all(s.shape == (3, B, H) for s in state)
    torch.testing.assert_close(out[:, -1], state[0][-1])
    first, mid = stack(x[:, :3])
    second, final_split = stack(x[:, 3:], mid)
    torch.testing.assert_close(torch.cat([first, second], 1), out)
    for a, b in zip(final_split, state):
        torch.testing.assert_close(a, b)


# ---- every registered cell --------------------------------------------------------------------
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("name, variant", cases(with_twin=True))
def test_equal_to_the_torch_twin(name, variant, num_layers):
    check_twin_outputs(name, variant, num_layers)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name, variant", cases())
def test_every_backend_equals_autograd(name, variant, dtype):
    check_backends_agree(name, variant, dtype)


@pytest.mark.parametrize("name, variant", mark_slow(cases(), "lstm-peephole=True", "gru", "rru"))  # 1-3 s each
def test_gradcheck_every_backend(name, variant):
    check_gradcheck(name, variant)


@pytest.mark.parametrize("name, variant", cases())
def test_state_api(name, variant):
    check_state_api(name, variant)


@pytest.mark.parametrize("name, variant", cases(with_twin=True))
def test_parameter_names_and_shapes_match_torch(name, variant):
    mine, theirs = stack_of(name, variant, num_layers=1).layers[0].cell, twin(name, variant, 1)
    assert {n.removesuffix("_l0"): tuple(p.shape) for n, p in theirs.named_parameters()} == {
        n: tuple(p.shape) for n, p in mine.named_parameters()}
    assert mine.weight_hh.shape == (len(CELLS[name].gates) * H, H)  # the registry's gates, H rows each


# ---- a cell that exists only here -----------------------------------------------------------
class ToyCell(nn.Module):
    """A leaky tanh unit with an option: h' = a h + (1 − a) tanh(W_ih x + b_ih + W_hh h + b_hh)."""

    def __init__(self, input_size: int, hidden_size: int, leak: float = 0.25) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.leak = input_size, hidden_size, leak
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(hidden_size))
        for p in self.parameters():
            nn.init.uniform_(p, -1 / math.sqrt(hidden_size), 1 / math.sqrt(hidden_size))

    def forward(self, x, state, weight_hh=None, recurrent_mask=None):
        (h,) = state
        h_in = h if recurrent_mask is None else h * recurrent_mask
        w_hh = self.weight_hh if weight_hh is None else weight_hh
        z = torch.tanh(x @ self.weight_ih.T + self.bias_ih + h_in @ w_hh.T + self.bias_hh)
        return (self.leak * h + (1 - self.leak) * z,)


def test_a_toy_cell_gets_every_check(monkeypatch):
    """One registry entry, no other edit: the stack runs it (auto: autograd, the only backend),
    and the generic checks pass on it; they fail on a cell that breaks the state API."""
    monkeypatch.setitem(CELLS, "toy", CellType(ToyCell, ("z",), ("h",), {"leak": 0.25}))
    assert backends.runnable(CELLS["toy"], ToyCell(I, H)) == ["auto", "autograd"]
    from tests.test_regularizers import check_evaluation, check_gradcheck_with_every_regularizer

    check_backends_agree("toy", {}, torch.float64)
    check_gradcheck("toy", {})
    check_state_api("toy", {})
    check_evaluation("toy")  # the regularizers' checks too
    check_gradcheck_with_every_regularizer("toy")
    with pytest.raises(ConfigError, match=r"impl: torch cannot run cell: toy .*use impl: auto, autograd$"):
        RecurrentStack("toy", I, H, impl="torch")

    class Broken(ToyCell):  # cuts the gradient through its state: gradcheck must notice
        def forward(self, x, state, weight_hh=None, recurrent_mask=None):
            return super().forward(x, (state[0].detach(),), weight_hh, recurrent_mask)

    monkeypatch.setitem(CELLS, "toy", CellType(Broken, ("z",), ("h",), {"leak": 0.25}))
    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        check_gradcheck("toy", {})


# ---- what is particular to one cell ---------------------------------------------------------
@pytest.mark.parametrize("forget_bias", [1.0, 2.5, 0.0])
def test_forget_gate_bias_initialisation(forget_bias):
    cell = LSTMCell(I, H, forget_bias=forget_bias)
    total = cell.bias_ih + cell.bias_hh
    torch.testing.assert_close(total[H : 2 * H], torch.full((H,), forget_bias))
    assert not torch.allclose(total[:H], torch.full((H,), forget_bias))  # only the f slice


@pytest.mark.parametrize("cell, twin_cell, options", [(RNNCell, nn.RNNCell, {}), (RNNCell, nn.RNNCell, {"nonlinearity": "relu"}),
                                                      (LSTMCell, nn.LSTMCell, {}), (GRUCell, nn.GRUCell, {})])
def test_cell_steps_match_torch_cells(cell, twin_cell, options):
    """One step in float64: our tuple state against torch's cells."""
    torch.manual_seed(2)
    x = torch.randn(B, I, dtype=torch.float64)
    mine, ref = cell(I, H, **options).double(), twin_cell(I, H, **options).double()
    ref.load_state_dict(mine.state_dict())
    state = tuple(torch.randn(B, H, dtype=torch.float64) for _ in range(2 if cell is LSTMCell else 1))
    expected = ref(x, as_torch(state))
    for a, b in zip(mine(x, state), expected if isinstance(expected, tuple) else (expected,)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def rru_step_as_the_paper_writes_it(cell: RRUCell, x, h, c):
    """LUMII-Syslab/RRU cells/RRUCell.py ``call`` (one ReLU layer, no dropout), transcribed in
    numpy on its own layout: one kernel on [x, state], candidate first in the W output."""
    J_kernel = np.concatenate([cell.weight_ih.detach().numpy(), cell.weight_hh.detach().numpy()], 1).T
    J_bias = (cell.bias_ih + cell.bias_hh).detach().numpy()
    W_kernel, W_bias = cell.weight_out.detach().numpy().T, cell.bias_out.detach().numpy()
    S, Z = cell.retain.detach().numpy() * 10, cell.rezero.detach().numpy()  # mul_lr_multiplier = 10
    after_j = np.concatenate([x, c], 1) @ J_kernel + J_bias
    after_j = after_j / np.sqrt(np.mean(after_j ** 2, -1, keepdims=True) + 1e-6)  # instance_norm
    after_w = np.maximum(after_j, 0) @ W_kernel + W_bias
    H = cell.hidden_size
    output, candidate = after_w[:, H:], after_w[:, :H]
    return output, c / (1 + np.exp(-S)) + candidate * Z


def test_rru_step_is_the_papers_cell():
    torch.manual_seed(4)
    cell = RRUCell(I, H).double()
    with torch.no_grad():
        for p in cell.parameters():
            p.uniform_(-0.5, 0.5)  # the zero-initialised ones too
    x, h, c = (torch.randn(B, n, dtype=torch.float64) for n in (I, H, H))
    h_new, c_new = cell(x, (h, c))
    h_ref, c_ref = rru_step_as_the_paper_writes_it(cell, x.numpy(), h.numpy(), c.numpy())
    np.testing.assert_allclose(h_new.detach().numpy(), h_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(c_new.detach().numpy(), c_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(cell(x, (h.neg(), c))[0], h_new)  # the previous h is only an output


def test_rru_starts_as_the_paper_initialises_it_also_in_a_stack():
    torch.manual_seed(5)
    stack = RecurrentStack("rru", 88, 128, 2)
    for cell in (layer.cell for layer in stack.layers):
        M = cell.middle_size
        assert (M, tuple(cell.weight_ih.shape), tuple(cell.weight_hh.shape)) == (
            round(2 * (cell.input_size + 128)), (M, cell.input_size), (M, 128))
        assert not cell.rezero.any() and not cell.bias_ih.any() and not cell.bias_out.any()
        keep = torch.sigmoid(10 * cell.retain)
        assert 0.01 <= keep.min() and keep.max() <= 0.99 and keep.std() > 0.2  # U(0.01, 0.99)
        bound = math.sqrt(6 / (cell.input_size + 128 + M))
        assert cell.weight_hh.abs().max() <= bound and cell.weight_hh.abs().max() > 0.9 * bound
    # ReZero at 0: at first the state only decays, and h is read from the input alone
    x = torch.randn(3, 5, 88)
    c0 = torch.randn(2, 3, 128)
    _, (_, c) = stack(x, (torch.zeros(2, 3, 128), c0))
    keep = torch.stack([torch.sigmoid(10 * layer.cell.retain) for layer in stack.layers])
    torch.testing.assert_close(c, c0 * keep.unsqueeze(1) ** 5)


def test_rru_middle_dropout_is_fresh_each_step_in_training_only():
    torch.manual_seed(6)
    plain = RecurrentStack("rru", I, H, impl="autograd").double()
    dropped = RecurrentStack("rru", I, H, impl="autograd", middle_dropout=0.4).double()
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(B, T, I, dtype=torch.float64)
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped(x)[0], plain(x)[0], rtol=0, atol=0)  # off at evaluation
    dropped.train()
    cell = dropped.layers[0].cell
    with torch.random.fork_rng():
        torch.manual_seed(0)
        first = cell(x[:, 0], (x.new_zeros(B, H),) * 2)
        second = cell(x[:, 0], (x.new_zeros(B, H),) * 2)
    assert not torch.allclose(first[0], second[0])  # a new mask at every call (every step)
    x.requires_grad_()

    def fn(x):  # the same masks at every evaluation: gradcheck through the dropped units
        with torch.random.fork_rng():
            torch.manual_seed(1)
            return dropped(x)[0]

    assert torch.autograd.gradcheck(fn, (x,))
    with pytest.raises(ConfigError, match="middle_dropout"):
        RecurrentStack("lstm", I, H, middle_dropout=0.3)


def test_a_bare_tensor_state_is_refused():
    with pytest.raises(TypeError, match=r"state must be a tuple \('h',\)"):
        RecurrentStack("rnn", I, H)(torch.randn(B, T, I), torch.zeros(1, B, H))


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(3)
    stack = RecurrentStack("lstm", I, H, 2, dropout=0.5, impl="autograd")
    x = torch.randn(B, T, I)
    stack.eval()
    torch.testing.assert_close(stack(x)[0], stack(x)[0])
    stack.train()
    assert not torch.allclose(stack(x)[0], stack(x)[0])


def test_options_and_impls_a_cell_cannot_take_are_one_line_errors():
    with pytest.raises(ConfigError, match="peephole: True does not apply to cell: gru"):
        RecurrentStack("gru", I, H, peephole=True)
    with pytest.raises(ConfigError, match="nonlinearity: 'relu' does not apply to cell: lstm"):
        RecurrentStack("lstm", I, H, nonlinearity="relu")
    with pytest.raises(ConfigError, match="impl: torch cannot run cell: lstm with peephole: True"):
        RecurrentStack("lstm", I, H, peephole=True, impl="torch")
    with pytest.raises(ConfigError, match=r"impl: cpp \(the hand-written backward, C\+\+ loops\) does not exist for "
                                          r"cell: gru; use impl: auto, autograd, torch, reference, triton"):
        RecurrentStack("gru", I, H, impl="cpp")
    with pytest.raises(ConfigError, match=r"impl must be one of \['auto', 'torch', 'cpp', 'reference', 'autograd', "
                                          r"'triton'\], got 'fast'"):
        RecurrentStack("lstm", I, H, impl="fast")
    with pytest.raises(ConfigError, match=r"cell must be one of \['rnn', 'lstm', 'gru', 'rru'\]"):
        RecurrentStack("transformer", I, H)


@pytest.mark.parametrize("old, cell, new", [("native", "lstm", "torch"), ("bptt", "lstm", "cpp"),
                                            ("bptt", "gru", "reference")])
def test_old_impl_names_keep_working_with_one_line(old, cell, new):
    from seqmodels.backends import _deprecated

    _deprecated.cache_clear()
    with pytest.warns(FutureWarning, match=rf"impl: {old} is deprecated, use impl: {'torch' if old == 'native' else 'cpp'}"
                                           r".*valid values: auto, torch, cpp, reference, autograd, triton"):
        assert RecurrentStack(cell, I, H, impl=old).impl == new
