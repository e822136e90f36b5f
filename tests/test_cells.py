"""The cells against torch.nn: equal outputs and states in float64 after loading a torch
state dict (and equal torch outputs after exporting back); shapes, the state API and the
registry."""
from __future__ import annotations

import pytest
import torch

from seqmodels import CELLS, GRUCell, LSTMCell, RecurrentStack, RNNCell
from seqmodels.errors import ConfigError

B, T, I, H = 4, 7, 5, 6
TORCH = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
TORCH_CELLS = {"rnn": torch.nn.RNNCell, "lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}
CASES = [("rnn", "tanh"), ("rnn", "relu"), ("lstm", "tanh"), ("gru", "tanh")]


def torch_reference(cell: str, num_layers: int, nonlinearity: str = "tanh") -> torch.nn.Module:
    extra = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
    return TORCH[cell](I, H, num_layers, batch_first=True, **extra).double()


def ours(cell: str, num_layers: int, nonlinearity: str = "tanh", impl: str = "autograd") -> RecurrentStack:
    return RecurrentStack(cell, I, H, num_layers, nonlinearity=nonlinearity, impl=impl).double()


def random_state(cell: str, num_layers: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(num_layers, B, H, dtype=torch.float64) for _ in CELLS[cell].state)


def as_torch(state: tuple):
    """torch.nn's convention: h alone, or (h, c)."""
    return state if len(state) > 1 else state[0]


@pytest.mark.parametrize("impl", ["autograd", "native"])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("cell,nonlinearity", CASES)
def test_torch_state_dict_gives_torch_outputs(cell, nonlinearity, num_layers, impl):
    torch.manual_seed(0)
    ref = torch_reference(cell, num_layers, nonlinearity)
    stack = ours(cell, num_layers, nonlinearity, impl)
    stack.load_torch_state_dict(ref.state_dict())
    x = torch.randn(B, T, I, dtype=torch.float64)
    for state in (None, random_state(cell, num_layers)):
        out_ref, state_ref = ref(x, None if state is None else as_torch(state))
        out, final = stack(x, state)
        assert isinstance(final, tuple) and len(final) == len(CELLS[cell].state)
        torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=0)
        for a, b in zip(final, state_ref if isinstance(state_ref, tuple) else (state_ref,)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("cell,nonlinearity", CASES)
def test_export_to_torch_gives_our_outputs(cell, nonlinearity, num_layers):
    torch.manual_seed(1)
    stack = ours(cell, num_layers, nonlinearity)
    ref = torch_reference(cell, num_layers, nonlinearity)
    ref.load_state_dict(stack.torch_state_dict())
    x = torch.randn(B, T, I, dtype=torch.float64)
    torch.testing.assert_close(stack(x)[0], ref(x)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cell", list(CELLS))
def test_parameter_names_and_shapes_match_torch(cell):
    mine, theirs = CELLS[cell].cell(I, H), TORCH[cell](I, H)
    assert {n.removesuffix("_l0"): tuple(p.shape) for n, p in theirs.named_parameters()} == {
        n: tuple(p.shape) for n, p in mine.named_parameters()}
    assert mine.weight_hh.shape == (len(CELLS[cell].gates) * H, H)  # the registry's gates, H rows each


@pytest.mark.parametrize("forget_bias", [1.0, 2.5, 0.0])
def test_forget_gate_bias_initialisation(forget_bias):
    cell = LSTMCell(I, H, forget_bias=forget_bias)
    total = cell.bias_ih + cell.bias_hh
    torch.testing.assert_close(total[H : 2 * H], torch.full((H,), forget_bias))
    assert not torch.allclose(total[:H], torch.full((H,), forget_bias))  # only the f slice


@pytest.mark.parametrize("cell", [LSTMCell, RNNCell, GRUCell])
def test_cell_steps_match_torch_cells(cell):
    """One step in float64: our tuple state against torch's cells."""
    torch.manual_seed(2)
    name = {LSTMCell: "lstm", RNNCell: "rnn", GRUCell: "gru"}[cell]
    x = torch.randn(B, I, dtype=torch.float64)
    state = tuple(torch.randn(B, H, dtype=torch.float64) for _ in CELLS[name].state)
    mine, ref = cell(I, H).double(), TORCH_CELLS[name](I, H).double()
    ref.load_state_dict(mine.state_dict())
    expected = ref(x, as_torch(state))
    for a, b in zip(mine(x, state), expected if isinstance(expected, tuple) else (expected,)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_relu_rnn_step_matches_torch():
    torch.manual_seed(2)
    x, h = torch.randn(B, I), torch.randn(B, H)
    mine, ref = RNNCell(I, H, "relu"), torch.nn.RNNCell(I, H, nonlinearity="relu")
    ref.load_state_dict(mine.state_dict())
    torch.testing.assert_close(mine(x, (h,))[0], ref(x, h))


@pytest.mark.parametrize("impl", ["autograd", "native"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_state_api_shapes(cell, impl):
    x = torch.randn(B, T, I)
    out, state = RecurrentStack(cell, I, H, 3, dropout=0.2, impl=impl)(x)
    assert out.shape == (B, T, H) and isinstance(state, tuple) and len(state) == len(CELLS[cell].state)
    assert all(s.shape == (3, B, H) for s in state)
    torch.testing.assert_close(out[:, -1], state[0][-1])  # the last output is the top layer's final h


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


@pytest.mark.parametrize("cell", list(CELLS))
def test_state_carries_over_between_calls(cell):
    torch.manual_seed(4)
    stack = RecurrentStack(cell, I, H, 2, impl="autograd")
    x = torch.randn(B, T, I)
    whole, final = stack(x)
    first, state = stack(x[:, :3])
    second, final_split = stack(x[:, 3:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)
    for a, b in zip(final_split, final):
        torch.testing.assert_close(a, b)


# ---- the registry decides; nothing else branches on the cell's name ---------------------------
@pytest.mark.parametrize("cell", list(CELLS))
def test_every_impl_the_registry_offers_computes_the_same_function(cell):
    torch.manual_seed(5)
    kind = CELLS[cell]
    impls = ["autograd", "native"] + (["bptt"] if kind.bptt else [])
    stacks = {impl: RecurrentStack(cell, I, H, 2, impl=impl).double() for impl in impls}
    for stack in stacks.values():
        stack.load_state_dict(stacks["autograd"].state_dict())
    x = torch.randn(B, T, I, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 1])
    want = stacks["autograd"](x, lengths=lengths)
    for impl, stack in stacks.items():
        out, state = stack(x, lengths=lengths)
        torch.testing.assert_close(out, want[0], atol=1e-10, rtol=0, msg=impl)
        for a, b in zip(state, want[1]):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=impl)


def test_options_and_impls_a_cell_cannot_take_are_one_line_errors():
    with pytest.raises(ConfigError, match="peephole: True does not apply to cell: gru"):
        RecurrentStack("gru", I, H, peephole=True)
    with pytest.raises(ConfigError, match="nonlinearity: 'relu' does not apply to cell: lstm"):
        RecurrentStack("lstm", I, H, nonlinearity="relu")
    with pytest.raises(ConfigError, match="impl: torch cannot run cell: lstm with peephole: True"):
        RecurrentStack("lstm", I, H, peephole=True, impl="torch")
    import dataclasses

    from seqmodels.cells import CELLS
    from seqmodels.recurrent import check_impl

    without = dataclasses.replace(CELLS["gru"], bptt=None)  # a cell registered without a hand-written BPTT
    with pytest.raises(ConfigError, match="impl: cpp has no hand-written backward for cell: gru"):
        check_impl("bptt", without, RecurrentStack("gru", I, H).layers[0].cell, "gru", {})
    with pytest.raises(ConfigError, match=r"cell must be one of \['rnn', 'lstm', 'gru'\]"):
        RecurrentStack("transformer", I, H)
