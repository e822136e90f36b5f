"""seqmodels.nn against torch.nn: the same constructor, call, shapes, parameter names and
initialisation; outputs, final states and every gradient equal in float64 across layers,
directions, batch_first, padded and packed input, with and without an initial state, for every
backend that runs the case; the extras; one-line errors."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqmodels.nn as snn
from seqmodels import backends
from seqmodels.errors import ConfigError
from seqmodels.registry import CELLS
from tests.helpers import mark_slow

NAMES = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}  # registry cell -> module name (torch's and ours)
I, H, B, T = 3, 4, 3, 5
LENGTHS = torch.tensor([5, 2, 4])


def impls_for(cell: str, device: str = "cpu") -> list[str]:
    module = getattr(snn, NAMES[cell])(I, H)
    return [b for b in backends.runnable(module.kind, module.first_cell())
            if b != ("triton" if device == "cpu" else "cpp")]


def outputs_and_grads(module, inp, hx):
    out, h = module(inp, hx)
    data = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    states = h if isinstance(h, tuple) else (h,)
    loss = (data * torch.linspace(-1, 1, data.numel(), dtype=data.dtype).view_as(data)).sum() + \
        sum((s ** 2).sum() for s in states)
    inputs = list(module.parameters()) + [t for t in (hx if isinstance(hx, tuple) else (hx,)) if t is not None]
    return [data, *states], torch.autograd.grad(loss, inputs), out


def check_equal_to_torch(cell: str, device: str = "cpu", atol: float = 1e-9) -> int:
    """Every case of the matrix, every backend: returns how many cases ran."""
    name, ran = NAMES[cell], 0
    for layers, bi, bf, packed, with_hx in itertools.product([1, 2], [False, True], [False, True], [False, True],
                                                             [False, True]):
        torch.manual_seed(1)
        ref = getattr(torch.nn, name)(I, H, layers, batch_first=bf, bidirectional=bi).double().to(device)
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(*((B, T) if bf else (T, B)), I, generator=gen, dtype=torch.float64).to(device)
        hx = None
        if with_hx:
            h = torch.randn(layers * (1 + bi), B, H, generator=gen, dtype=torch.float64).to(device)
            hx = (h, torch.randn(h.shape, generator=gen, dtype=torch.float64).to(device)) if cell == "lstm" else h
            hx = tuple(t.requires_grad_() for t in hx) if cell == "lstm" else hx.requires_grad_()
        inp = pack_padded_sequence(x, LENGTHS, batch_first=bf, enforce_sorted=False) if packed else x
        want, want_grads, want_out = outputs_and_grads(ref, inp, hx)
        for impl in impls_for(cell, device):
            torch.manual_seed(1)
            ours = getattr(snn, name)(I, H, layers, batch_first=bf, bidirectional=bi, impl=impl).double().to(device)
            assert list(ours.state_dict()) == list(ref.state_dict())
            for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
                assert torch.equal(a, b), "initialised as torch from the same seed"
            got, got_grads, got_out = outputs_and_grads(ours, inp, hx)
            case = (cell, layers, bi, bf, packed, with_hx, impl)
            if packed:
                assert isinstance(got_out, torch.nn.utils.rnn.PackedSequence), case
                assert torch.equal(got_out.batch_sizes, want_out.batch_sizes), case
                assert torch.equal(got_out.unsorted_indices, want_out.unsorted_indices), case
            for a, b in zip(got + list(got_grads), want + list(want_grads)):
                torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=str(case))
            ran += 1
    return ran


@pytest.mark.parametrize("cell", mark_slow(list(NAMES), "rnn", "gru"))  # 1-2 s each
def test_equal_to_torch_in_float64(cell):
    assert check_equal_to_torch(cell) == 32 * len(impls_for(cell))


@pytest.mark.gpu
@pytest.mark.parametrize("cell", list(NAMES))
def test_equal_to_torch_on_the_gpu(cell):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    assert check_equal_to_torch(cell, "cuda", atol=1e-7) == 32 * len(impls_for(cell, "cuda"))


@pytest.mark.parametrize("cell", list(NAMES))
def test_unbatched_input_as_torch(cell):
    torch.manual_seed(0)
    ref = getattr(torch.nn, NAMES[cell])(I, H, 2, bidirectional=True)
    ours = getattr(snn, NAMES[cell])(I, H, 2, bidirectional=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, I)
    h = torch.randn(4, H)
    hx = (h, torch.randn(4, H)) if cell == "lstm" else h
    (out, state), (ref_out, ref_state) = ours(x, hx), ref(x, hx)
    assert out.shape == ref_out.shape == (T, 2 * H)
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(state if cell == "lstm" else (state,), ref_state if cell == "lstm" else (ref_state,)):
        assert a.shape == (4, H)
        torch.testing.assert_close(a, b)


def test_state_dicts_load_both_ways_and_the_constructor_is_torchs():
    ref = torch.nn.LSTM(5, 7, 2, True, True, 0.0, True)  # positional, as torch takes them
    ours = snn.LSTM(5, 7, 2, True, True, 0.0, True)
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert ours.weight_hh_l1_reverse.shape == (28, 7)
    ours.flatten_parameters()  # exists; a no-op on a CPU
    relu = snn.RNN(3, 4, 1, "relu")  # torch.nn.RNN's 4th positional argument
    assert relu.first_cell().nonlinearity == "relu"
    no_bias = snn.GRU(3, 4, bias=False)
    assert list(no_bias.state_dict()) == list(torch.nn.GRU(3, 4, bias=False).state_dict())
    x = torch.randn(T, B, 3)
    ref_gru = torch.nn.GRU(3, 4, bias=False)
    ref_gru.load_state_dict(no_bias.state_dict())
    for impl in impls_for("gru"):
        no_bias.impl = impl
        torch.testing.assert_close(no_bias(x)[0], ref_gru(x)[0], atol=1e-6, rtol=0, msg=impl)


def test_a_script_swaps_the_import_only():
    """Everything but the recurrent layers is torch.nn's."""
    assert snn.Linear is torch.nn.Linear and snn.init.uniform_ is torch.nn.init.uniform_
    assert snn.LSTM is not torch.nn.LSTM and issubclass(snn.LSTM, torch.nn.Module)


@pytest.mark.parametrize("cell, options", [("lstm", dict(peephole=True)), ("rnn", dict(nonlinearity="relu")),
                                           ("gru", {})])
def test_extras_with_both_directions_equal_autograd(cell, options):
    """The regularizers and the peephole cell, bidirectional and packed: every hand-written
    backward draws the same masks as autograd and gives its outputs and gradients."""
    regs = dict(recurrent_dropout=0.3, zoneout_h=0.2, weight_drop=0.4, **({"zoneout_c": 0.3} if cell == "lstm" else {}))
    results = {}
    for impl in ["autograd"] + [b for b in impls_for(cell) if b in ("cpp", "reference")]:
        torch.manual_seed(0)
        module = getattr(snn, NAMES[cell])(I, H, 2, bidirectional=True, impl=impl, **options, **regs).double()
        x = torch.randn(T, B, I, dtype=torch.float64)
        inp = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
        torch.manual_seed(5)
        results[impl] = outputs_and_grads(module, inp, None)[:2]
    want = results.pop("autograd")
    assert results, "a hand-written backward was compared"
    for impl, (got, grads) in results.items():
        for a, b in zip(got + list(grads), want[0] + list(want[1])):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=impl)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
@pytest.mark.parametrize("B, H", [(3, 4), (8, 64)])  # (8, 64): big enough a step for the C++ loops to share it
def test_the_loops_step_backwards_as_on_a_reversed_copy(cell, B, H):
    """The C++ loops' reverse direction (reverse=True on x as it is) equals the same loops on the
    time-reversed copy, reversed back: outputs, final states and every gradient, with a sequence
    of length 0, and the regularizers' masks in time order."""
    from seqmodels.bptt import fast
    from seqmodels.recurrent import RecurrentStack, reverse_padded, regularizer_masks

    if not fast.runs(torch.zeros(1, dtype=torch.float64)):
        pytest.skip("the C++ loops cannot be built here")
    T, I = 7, 5
    stack = RecurrentStack(cell, I, H, impl="cpp", zoneout_h=0.3, recurrent_dropout=0.2,
                           **({"peephole": True, "zoneout_c": 0.2} if cell == "lstm" else {})).double()
    layer, layer_cell = stack.kind.layers["cpp"], stack.layers[0].cell
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    lengths = torch.arange(B) % (T + 1)  # 0, 1, ..., including 0 and T
    state = tuple(torch.randn(B, H, dtype=torch.float64, requires_grad=True) for _ in range(2 if cell == "lstm" else 1))
    weight_hh, rho, zoneout = regularizer_masks(stack.regularizers, layer_cell, B, T, x, True, len(state))
    results = []
    for reverse in (True, False):
        x_in = x if reverse else reverse_padded(x, lengths)
        masks = tuple(reverse_padded(d, lengths) for d in zoneout) if reverse else zoneout
        out, final = layer(x_in, state, layer_cell, lengths, weight_hh, rho, masks, **({"reverse": True} if reverse else {}))
        out = out if reverse else reverse_padded(out, lengths)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + \
            sum((s.sin()).sum() for s in final)
        results.append([out, *final, *torch.autograd.grad(loss, [x, *state, *stack.parameters()])])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="no reverse direction"):
        stack.kind.layers["reference"](x, state, layer_cell, lengths, reverse=True)


@pytest.mark.parametrize("make, message", [
    (lambda: snn.LSTM(3, 4, zonout_h=0.1), r"LSTM: unknown argument 'zonout_h'; it takes torch.nn.LSTM's arguments "
                                           r"\(input_size, .*\) and impl, autotune, .*, forget_bias, peephole"),
    (lambda: snn.LSTM(3, 4, proj_size=2), r"LSTM: proj_size=2 is not supported .*use proj_size=0, or torch.nn.LSTM"),
    (lambda: snn.GRU(3, 4, peephole=True), r"GRU: unknown argument 'peephole'"),
    (lambda: snn.GRU(3, 4, impl="cpp"), r"impl: cpp .* does not exist for cell: gru"),
    (lambda: snn.LSTM(3, 4)(pack_padded_sequence(torch.randn(5, 2, 6), torch.tensor([5, 3]))),
     r"LSTM: the PackedSequence has \(6,\) features a step, expected input_size=3"),
    (lambda: snn.LSTM(3, 4, 2)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))),
     r"LSTM: hx of shape \(1, 2, 4\), expected \(2, 2, 4\) \(num_layers \* num_directions, batch, hidden_size\)"),
    (lambda: snn.GRU(3, 4)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))),
     r"GRU: hx must be a tensor h_0, got tuple of 2"),
    (lambda: snn.RNN(3, 4)(torch.randn(5, 2, 7)), r"RNN: input of shape \(5, 2, 7\); expected \(T, B, 3\)"),
])
def test_bad_arguments_are_one_line_errors(make, message):
    with pytest.raises(ConfigError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_every_registered_cell_with_a_torch_twin_has_a_module():
    assert {name for name, kind in CELLS.items() if kind.torch_twin(kind.options)} == set(NAMES)


# ---- someone else's script (tests/helpers/word_lm.py: PyTorch's word-level LM example) ---------------
@pytest.mark.slow
@pytest.mark.parametrize("rnn_type", ["LSTM", "GRU", "RNN_TANH"])
def test_a_word_language_model_trains_the_same_with_either_import(rnn_type):
    """One epoch from the same seed, changing only the module the script builds its layers
    from: with dropout 0 in float64 (impl autograd) every training loss agrees to 1e-5; with
    the script's dropout (auto's backend) the validation losses agree within 1%."""
    from tests.helpers import word_lm

    losses_torch, val_torch = word_lm.run(torch.nn, rnn_type, 0.0, dtype=torch.float64)
    losses_ours, val_ours = word_lm.run(snn, rnn_type, 0.0, dtype=torch.float64, impl="autograd")
    assert len(losses_ours) == len(losses_torch) > 50
    assert max(abs(a - b) for a, b in zip(losses_ours, losses_torch)) < 1e-5
    assert losses_torch[-1] < losses_torch[0] - 0.2, "the script's model learns something"
    _, val_torch = word_lm.run(torch.nn, rnn_type, 0.2)
    _, val_ours = word_lm.run(snn, rnn_type, 0.2)
    assert abs(val_ours - val_torch) <= 0.01 * val_torch


@pytest.mark.slow  # torch.compile: ~20 s each
@pytest.mark.parametrize("impl", ["cpp", "reference"])  # compiled C++ (a graph break) and plain torch
def test_the_script_runs_under_torch_compile_with_eager_outputs(impl):
    from tests.helpers import word_lm

    torch.manual_seed(0)
    model = word_lm.make_model(snn, "LSTM", 40, 16, 32, 2, 0.2).eval()
    model.rnn.impl = impl
    data, hidden = torch.randint(0, 40, (20, 4)), model.init_hidden(4)
    eager, (h, c) = model(data, hidden)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out, (h2, c2) = torch.compile(model)(data, hidden)
    out.sum().backward()
    for a, b in zip([out, h2, c2, *[p.grad for p in model.parameters()]], [eager, h, c, *grads]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- one engine: the tasks' stack is seqmodels.nn's module, batch first with a tuple state ----------
def test_the_tasks_stack_is_the_same_engine_and_loads_old_checkpoints():
    from seqmodels import RecurrentStack
    from seqmodels.recurrent import RNNBase

    stack = RecurrentStack("lstm", I, H, num_layers=2, peephole=True)
    assert isinstance(stack, RNNBase) and isinstance(snn.LSTM(I, H), RNNBase)
    assert "weight_ci_l1" in stack.state_dict() and stack.batch_first
    old = {f"layers.{n.rsplit('_l', 1)[1]}.cell.{n.rsplit('_l', 1)[0]}": v.clone() + 1
           for n, v in stack.state_dict().items()}  # the names before they were torch's
    fresh = RecurrentStack("lstm", I, H, num_layers=2, peephole=True)
    fresh.load_state_dict(old)
    for n, v in stack.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[n], v + 1)
    twin = snn.LSTM(I, H, 2, batch_first=True, peephole=True)
    twin.load_state_dict(fresh.state_dict())
    x = torch.randn(B, T, I)
    torch.testing.assert_close(twin(x)[0], fresh(x)[0])


def test_a_task_that_reads_whole_sequences_takes_bidirectional_the_others_say_no(tmp_path):
    from lightning.pytorch import Trainer

    from data_modules import SumsDataModule
    from seqmodels.formats import UNK
    from seqmodels.tasks import CharLanguageModel, NetworkConfig, PolyphonicMusicModel, SumsRegressor

    torch.manual_seed(0)
    model = SumsRegressor(NetworkConfig(cell="gru", hidden_size=8, bidirectional=True))
    assert model.stack.bidirectional and model.head.in_features == 16
    data = SumsDataModule(seq_len=6, train_size=64, val_size=16, test_size=16, batch_size=16)
    trainer = Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(model, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for task, kwargs in ((CharLanguageModel, dict(vocab=[UNK, "a"])), (PolyphonicMusicModel, {})):
        with pytest.raises(ConfigError, match=r"^model.network.bidirectional: true does not fit "
                                              rf"{task.__name__}: it predicts each next step .*; use false$"):
            task(network=NetworkConfig(hidden_size=8, bidirectional=True), **kwargs)
