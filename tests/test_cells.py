"""The cells against torch.nn: equal outputs and states in float64 after loading a torch
state dict (and equal torch outputs after exporting back); shapes and the state API."""
from __future__ import annotations

import pytest
import torch

from seqmodels import LSTMCell, RecurrentStack, RNNCell

B, T, I, H = 4, 7, 5, 6


def torch_reference(cell: str, num_layers: int, nonlinearity: str = "tanh") -> torch.nn.Module:
    if cell == "lstm":
        return torch.nn.LSTM(I, H, num_layers, batch_first=True).double()
    return torch.nn.RNN(I, H, num_layers, nonlinearity=nonlinearity, batch_first=True).double()


def random_state(cell: str, num_layers: int):
    h = torch.randn(num_layers, B, H, dtype=torch.float64)
    return (h, torch.randn_like(h)) if cell == "lstm" else h


CASES = [("rnn", "tanh"), ("rnn", "relu"), ("lstm", "tanh")]


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("cell,nonlinearity", CASES)
def test_torch_state_dict_gives_torch_outputs(cell, nonlinearity, num_layers):
    torch.manual_seed(0)
    ref = torch_reference(cell, num_layers, nonlinearity)
    ours = RecurrentStack(cell, I, H, num_layers, nonlinearity=nonlinearity, impl="autograd").double()
    ours.load_torch_state_dict(ref.state_dict())
    x = torch.randn(B, T, I, dtype=torch.float64)
    for state in (None, random_state(cell, num_layers)):
        out_ref, state_ref = ref(x, state)
        out, final = ours(x, state)
        torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=0)
        if cell == "lstm":
            torch.testing.assert_close(final[0], state_ref[0], atol=1e-6, rtol=0)
            torch.testing.assert_close(final[1], state_ref[1], atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(final, state_ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("cell,nonlinearity", CASES)
def test_export_to_torch_gives_our_outputs(cell, nonlinearity, num_layers):
    torch.manual_seed(1)
    ours = RecurrentStack(cell, I, H, num_layers, nonlinearity=nonlinearity, impl="autograd").double()
    ref = torch_reference(cell, num_layers, nonlinearity)
    ref.load_state_dict(ours.torch_state_dict())
    x = torch.randn(B, T, I, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-6, rtol=0)


def test_parameter_names_and_shapes_match_torch():
    rnn = RNNCell(I, H)
    assert {n: tuple(p.shape) for n, p in rnn.named_parameters()} == {
        "weight_ih": (H, I), "weight_hh": (H, H), "bias_ih": (H,), "bias_hh": (H,)}
    torch_rnn = torch.nn.RNN(I, H)
    assert {n.removesuffix("_l0"): tuple(p.shape) for n, p in torch_rnn.named_parameters()} == {
        n: tuple(p.shape) for n, p in rnn.named_parameters()}
    lstm, torch_lstm = LSTMCell(I, H), torch.nn.LSTM(I, H)
    assert {n.removesuffix("_l0"): tuple(p.shape) for n, p in torch_lstm.named_parameters()} == {
        n: tuple(p.shape) for n, p in lstm.named_parameters()}


@pytest.mark.parametrize("forget_bias", [1.0, 2.5, 0.0])
def test_forget_gate_bias_initialisation(forget_bias):
    cell = LSTMCell(I, H, forget_bias=forget_bias)
    total = cell.bias_ih + cell.bias_hh
    torch.testing.assert_close(total[H : 2 * H], torch.full((H,), forget_bias))
    assert not torch.allclose(total[:H], torch.full((H,), forget_bias))  # only the f slice


def test_cell_steps_match_torch_cells():
    torch.manual_seed(2)
    x, h, c = torch.randn(B, I), torch.randn(B, H), torch.randn(B, H)
    ours, ref = LSTMCell(I, H), torch.nn.LSTMCell(I, H)
    ref.load_state_dict(ours.state_dict())
    for a, b in zip(ours(x, (h, c)), ref(x, (h, c))):
        torch.testing.assert_close(a, b)
    ours, ref = RNNCell(I, H, "relu"), torch.nn.RNNCell(I, H, nonlinearity="relu")
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x, h), ref(x, h))


@pytest.mark.parametrize("impl", ["autograd", "native"])
def test_state_api_shapes(impl):
    x = torch.randn(B, T, I)
    out, h = RecurrentStack("rnn", I, H, 2, impl=impl)(x)
    assert out.shape == (B, T, H) and h.shape == (2, B, H)
    out, (h, c) = RecurrentStack("lstm", I, H, 3, dropout=0.2, impl=impl)(x)
    assert out.shape == (B, T, H) and h.shape == c.shape == (3, B, H)
    torch.testing.assert_close(out[:, -1], h[-1])  # the last output is the top layer's final h


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(3)
    stack = RecurrentStack("lstm", I, H, 2, dropout=0.5, impl="autograd")
    x = torch.randn(B, T, I)
    stack.eval()
    torch.testing.assert_close(stack(x)[0], stack(x)[0])
    stack.train()
    assert not torch.allclose(stack(x)[0], stack(x)[0])


def test_state_carries_over_between_calls():
    torch.manual_seed(4)
    stack = RecurrentStack("lstm", I, H, 2, impl="autograd")
    x = torch.randn(B, T, I)
    whole, final = stack(x)
    first, state = stack(x[:, :3])
    second, final_split = stack(x[:, 3:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)
    torch.testing.assert_close(final_split[1], final[1])
