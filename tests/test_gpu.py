"""The GPU checks: ``python -m pytest -m gpu`` on a CUDA machine (skipped cleanly without one).

Every check runs on the CPU too, wherever the CPU can run it, so CI proves the checks
themselves; the GPU variants carry the ``gpu`` marker.

1. Every impl × cell × precision: the stack's outputs and every parameter's gradient agree
   with float32 autograd on the same device, to float32 tolerances, because the recurrence
   runs in float32 under every precision (seqmodels/recurrent.py); no gradient is all zero.
2. cuDNN runs on the module's own parameters: one flat buffer, no per-call copy, no warning;
   state dicts and switching ``impl`` work as before.
3. A short fit of each task (sums, text, music) under each precision ends clearly below its
   trivial baseline (mean predictor, unigram, per-pitch frequency), and mixed precision
   learns as well as 32-true.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from data_modules import CharTextDataModule, ChoralesDataModule, SumsDataModule
from seqmodels import compat
from seqmodels import backends
from seqmodels.recurrent import RecurrentStack
from seqmodels.registry import CELLS as REGISTRY
from seqmodels.tasks import CharLanguageModel, NetworkConfig, PolyphonicMusicModel, SumsRegressor
from tests.test_chorales_data import write_pickle

CUDA = pytest.param("cuda", marks=pytest.mark.gpu)
DEVICES = ["cpu", CUDA]
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# precisions each device runs: float16 autocast needs CUDA's loss scaler (the CLI falls back on CPU)
PRECISIONS = {"cpu": ["32-true", "bf16-mixed"], "cuda": ["32-true", "bf16-mixed", "16-mixed"]}
# every cell of the registry and its variants (rnn, rnn_relu, lstm, lstm_peephole, gru)
CELLS = {"_".join([name, *(v if isinstance(v, str) else k for k, v in variant.items())]): dict(cell=name, **variant)
         for name, kind in REGISTRY.items() for variant in kind.all_variants()}
LOSS_SCALE = 2.0 ** 16  # what 16-mixed's GradScaler starts with


@pytest.fixture
def exact_float32():
    """No TF32 for this test: float32 must then agree with float32 to float32 precision."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def run_stack(stack: RecurrentStack, x, lengths, weights, precision: str, device: str):
    """Forward and backward as a LightningModule's step under ``precision`` would run them:
    autocast for mixed precision, and for 16-mixed the loss scaled up and the gradients scaled
    back down (GradScaler's arithmetic). Returns output, final state and the gradients."""
    stack.zero_grad()
    mixed = precision in AUTOCAST_DTYPES
    context = torch.autocast(device, dtype=AUTOCAST_DTYPES[precision]) if mixed else contextlib.nullcontext()
    with context:
        out, state = stack(x, lengths=lengths)
        state = state if isinstance(state, tuple) else (state,)
        loss = (out * weights[0]).sum() + sum((s * w).sum() for s, w in zip(state, weights[1:]))
    scale = LOSS_SCALE if precision == "16-mixed" else 1.0
    (loss * scale).backward()
    grads = {n: p.grad / scale for n, p in stack.named_parameters()}
    return out, state, grads


def runnable(cell: str, device: str) -> list[str]:
    """The backends that run the cell on the device (the registry says), auto aside."""
    stack = RecurrentStack(**CELLS[cell])
    return [b for b in backends.runnable(stack.kind, stack.layers[0].cell)
            if b != "auto" and b != ("triton" if device == "cpu" else "cpp")]


def stack_cases():
    for device in DEVICES:
        name = device if isinstance(device, str) else "cuda"
        for precision in PRECISIONS[name]:
            for cell in CELLS:
                for impl in runnable(cell, "cpu" if name == "cpu" else "cuda"):
                    marks = device.marks if not isinstance(device, str) else ()
                    yield pytest.param(name, precision, cell, impl, marks=marks,
                                       id=f"{name}-{precision}-{cell}-{impl}")


@pytest.mark.parametrize("device,precision,cell,impl", list(stack_cases()))
@pytest.mark.parametrize("padded", [False, True], ids=["full", "lengths"])
def test_stack_matches_float32_autograd(device, precision, cell, impl, padded, exact_float32):
    torch.manual_seed(0)
    B, T, I, H = 5, 9, 4, 8
    reference = RecurrentStack(input_size=I, hidden_size=H, num_layers=2, impl="autograd", **CELLS[cell]).to(device)
    stack = RecurrentStack(input_size=I, hidden_size=H, num_layers=2, impl=impl, **CELLS[cell]).to(device)
    with torch.no_grad():
        for p in list(reference.parameters()) + list(stack.parameters()):
            p.normal_(0, 0.5)  # peepholes and all: none starts at zero
    stack.load_state_dict(reference.state_dict())
    x = torch.randn(B, T, I, device=device)
    lengths = torch.tensor([9, 3, 7, 1, 9]) if padded else None
    n_states = len(reference.kind.state)
    weights = [torch.randn(B, T, H, device=device)] + [torch.randn(2, B, H, device=device) for _ in range(n_states)]

    want_out, want_state, want_grads = run_stack(reference, x, lengths, weights, "32-true", device)
    out, state, grads = run_stack(stack, x, lengths, weights, precision, device)

    assert out.dtype == torch.float32 and all(s.dtype == torch.float32 for s in state), "the recurrence runs in float32"
    tol = 1e-5
    assert relative_error(out, want_out) < tol
    for s, w in zip(state, want_state):
        assert relative_error(s, w) < tol
    for name, want in want_grads.items():
        assert grads[name] is not None and torch.isfinite(grads[name]).all(), name
        assert grads[name].abs().max() > 0, f"the gradient of {name} is all zero"
        assert relative_error(grads[name], want) < tol, name


@pytest.mark.gpu
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_native_with_tf32_stays_close_to_float32(cell):
    """cuDNN's default float32 math (TF32 tensor cores allowed): about 3 decimal digits."""
    torch.manual_seed(0)
    reference = RecurrentStack(cell=cell, input_size=16, hidden_size=64, num_layers=2, impl="autograd").cuda()
    stack = RecurrentStack(cell=cell, input_size=16, hidden_size=64, num_layers=2, impl="torch").cuda()
    stack.load_state_dict(reference.state_dict())
    x = torch.randn(8, 50, 16, device="cuda")
    weights = [torch.randn(8, 50, 64, device="cuda")]
    want, _, want_grads = run_stack(reference, x, None, weights, "32-true", "cuda")
    got, _, grads = run_stack(stack, x, None, weights, "bf16-mixed", "cuda")
    assert relative_error(got, want) < 1e-2
    for name, g in want_grads.items():
        assert relative_error(grads[name], g) < 3e-2, name


def native_weights(stack: RecurrentStack) -> list[torch.Tensor]:
    return [getattr(layer.cell, n) for layer in stack.layers for n in RecurrentStack._NAMES]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_cudnn_gets_the_modules_own_parameters(device, cell):
    """On a GPU the native weights are views of one buffer (cuDNN's layout): no per-call copy
    and no 'not part of single contiguous chunk of memory' warning, under every precision.
    Values, Parameter objects, state dicts and switching impl are as before. On the CPU the
    flattening is a no-op."""
    torch.manual_seed(0)
    cpu = RecurrentStack(cell=cell, input_size=3, hidden_size=5, num_layers=3, impl="torch")
    params = list(cpu.parameters())
    values = {n: p.detach().clone() for n, p in cpu.named_parameters()}
    stack = cpu.to(device)
    assert all(a is b for a, b in zip(stack.parameters(), params))  # the same objects: optimizers stay valid
    for n, p in stack.named_parameters():
        assert torch.equal(p.detach().cpu(), values[n]), n
    storages = {w.untyped_storage().data_ptr() for w in native_weights(stack)}
    assert len(storages) == (1 if device == "cuda" else len(native_weights(stack)))
    assert compat.cudnn_is_flat(native_weights(stack)) == (device == "cuda")

    x = torch.randn(4, 6, 3, device=device)
    outputs = {}
    for precision in PRECISIONS[device]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, _, _ = run_stack(stack, x, None, [torch.ones(4, 6, 5, device=device)], precision, device)
        assert not [w for w in caught if "contiguous chunk" in str(w.message)], [str(w.message) for w in caught]
        outputs[precision] = out.detach()
    for impl in ["autograd"] + [b for b in ("reference",) if b in stack.kind.layers]:  # the same function, flattened parameters
        stack.impl = impl
        assert torch.allclose(stack(x)[0], outputs["32-true"], atol=1e-5), impl
    stack.impl = "torch"

    restored = RecurrentStack(cell=cell, input_size=3, hidden_size=5, num_layers=3, impl="torch")
    restored.load_state_dict({k: v.cpu() for k, v in stack.state_dict().items()})
    assert torch.allclose(restored(x.cpu())[0], outputs["32-true"].cpu(), atol=1e-5)
    assert stack.double()(x.double())[0].dtype == torch.float64  # moved again: flattened again
    assert compat.cudnn_is_flat(native_weights(stack)) == (device == "cuda")


# ---- short fits: every task learns under every precision --------------------------------------------
def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/char) of the training split's character frequencies on the val split."""
    counts = np.bincount(train, minlength=vocab_size) + 1.0
    return float(-np.log(counts / counts.sum())[val[1:]].mean())


def pitch_frequency_nll(train: list[np.ndarray], val: list[np.ndarray]) -> float:
    """Frame NLL (summed over 88 pitches) of independent per-pitch training frequencies on the
    val split's predicted frames (all but each sequence's first)."""
    q = np.clip(np.concatenate(train).mean(0), 1e-4, 1 - 1e-4)
    frames = np.concatenate([r[1:] for r in val]).astype(float)
    return float(-(frames * np.log(q) + (1 - frames) * np.log(1 - q)).sum(1).mean())


def sums_task(tmp_path):
    data = SumsDataModule(train_size=1024, val_size=256, test_size=64, batch_size=32, seq_len=8, test_lengths=[8])
    return SumsRegressor(network=NetworkConfig(cell="lstm", hidden_size=32)), data, "val/loss", data.target_variance


def text_task(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the cat sat on the mat. ", "a dog ran to the park! ", "we sing of the sea, ", "and so it goes.\n"]
    (tmp_path / "text.txt").write_text("".join(words[i] for i in rng.integers(0, len(words), 1500)))
    data = CharTextDataModule(path=str(tmp_path / "text.txt"), batch_size=16, eval_batch_size=16, bptt=32,
                              cache_dir=str(tmp_path / "cache"))
    data.prepare()
    model = CharLanguageModel(vocab=data.vocab, embedding_dim=16, network=NetworkConfig(hidden_size=64, num_layers=1))
    return model, data, "val/loss", unigram_loss(data.split_ids("train"), data.split_ids("val"), data.vocab_size)


def music_task(tmp_path):
    rng = np.random.default_rng(0)
    chords = [(60, 64, 67), (62, 65, 69), (64, 67, 71), (65, 69, 72), (67, 71, 74)]

    def song(n):  # chords stepping up the scale, from a random start
        start = int(rng.integers(0, len(chords)))
        return [chords[(start + t) % len(chords)] for t in range(n)]

    songs = {s: [song(int(rng.integers(12, 24))) for _ in range(k)] for s, k in (("train", 48), ("valid", 12), ("test", 4))}
    data = ChoralesDataModule(path=str(write_pickle(tmp_path / "songs.pickle", songs)), batch_size=8,
                              cache_dir=str(tmp_path / "cache"), progress=False)
    rolls = data.load()
    return (PolyphonicMusicModel(network=NetworkConfig(cell="lstm", hidden_size=32)), data, "val/nll",
            pitch_frequency_nll(rolls["train"], rolls["valid"]))


TASKS = {"sums": sums_task, "text": text_task, "music": music_task}
STEPS = 150


def short_fit(task: str, device: str, precision: str, tmp_path) -> tuple[float, float]:
    """(val loss after STEPS steps, the task's trivial baseline), same seed for every precision."""
    seed_everything(0)
    tmp_path.mkdir()
    model, data, metric, baseline = TASKS[task](tmp_path)
    model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = Trainer(accelerator=device, devices=1, precision=precision, max_steps=STEPS, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0, deterministic=False)
    trainer.fit(model, data)
    assert trainer.global_step == STEPS
    trainer.limit_val_batches = 1.0
    return float(trainer.validate(model, data, verbose=False)[0][metric]), baseline


FIT_DEVICES = DEVICES


@pytest.mark.parametrize("device", FIT_DEVICES)
@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.slow
def test_short_fit_learns_under_every_precision(task, device, tmp_path):
    results = {}
    for precision in PRECISIONS[device]:
        results[precision], baseline = short_fit(task, device, precision, tmp_path / precision)
    reference = results["32-true"]
    assert reference < 0.5 * baseline, f"{task}: 32-true ended at {reference:.4f}, baseline {baseline:.4f}"
    for precision, loss in results.items():
        assert math.isfinite(loss)
        # as well as 32-true: within a tenth of what 32-true gained over the baseline
        assert loss <= reference + 0.1 * (baseline - reference), (
            f"{task}: {precision} ended at {loss:.4f}, 32-true at {reference:.4f}, baseline {baseline:.4f}")


def test_flattened_weights_train_exactly_like_separate_ones(monkeypatch):
    """The plumbing around cuDNN's flattening, on the CPU: with torch's flattening stood in by
    the same operation (copy into one buffer, each weight a view of it), ``.to()`` flattens,
    values and Parameter objects stay, and three Adam steps of every impl give exactly the
    weights of an unflattened twin."""
    from torch.backends.cudnn import rnn

    def fake_flatten(weights, per_layer, input_size, mode, hidden_size, proj_size, num_layers, batch_first, bidi):
        buffer = torch.cat([w.detach().reshape(-1) for w in weights])
        offset = 0
        for w in weights:
            w.set_(buffer.untyped_storage(), offset, w.shape, w.stride())
            offset += w.numel()
        return buffer

    monkeypatch.setattr(compat, "cudnn_can_flatten", lambda weights: True)
    monkeypatch.setattr(torch, "_cudnn_rnn_flatten_weight", fake_flatten, raising=False)
    monkeypatch.setattr(torch, "_use_cudnn_rnn_flatten_weight", lambda: True, raising=False)
    monkeypatch.setattr(rnn, "get_cudnn_mode", lambda mode: 2)
    for impl in ("torch", "cpp", "reference", "autograd"):
        torch.manual_seed(0)
        twin = RecurrentStack(cell="lstm", input_size=3, hidden_size=6, num_layers=2, impl=impl)
        flat = RecurrentStack(cell="lstm", input_size=3, hidden_size=6, num_layers=2, impl=impl)
        flat.load_state_dict(twin.state_dict())
        params = list(flat.parameters())
        flat.to("cpu")  # _apply: flattened
        assert compat.cudnn_is_flat(native_weights(flat)) and not compat.cudnn_is_flat(native_weights(twin))
        assert all(a is b for a, b in zip(flat.parameters(), params))
        optimizers = [torch.optim.Adam(m.parameters(), lr=0.05) for m in (twin, flat)]
        x = torch.randn(4, 7, 3)
        for _ in range(3):
            for model, optimizer in zip((twin, flat), optimizers):
                optimizer.zero_grad()
                model(x)[0].square().mean().backward()
                optimizer.step()
        assert compat.cudnn_is_flat(native_weights(flat)), "optimizer steps keep the weights in the buffer"
        for (name, a), b in zip(twin.named_parameters(), flat.parameters()):
            assert torch.equal(a, b), f"{impl}: {name}"
