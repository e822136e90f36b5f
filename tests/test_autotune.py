"""``impl: auto`` by measurement (seqmodels.autotune): the selection with injected timings, the
time budget, the cache key and file (corrupt, unreadable, another torch version, unwritable),
and that measuring leaves no trace in parameters, gradients, optimizer state or random streams.
No test here depends on the speed of the host: timings are injected or only compared to
themselves."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from seqmodels import RecurrentStack, autotune


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Each test: its own cache file, nothing decided yet in this process."""
    path = tmp_path / "autotune.json"
    monkeypatch.setenv("SEQMODELS_AUTOTUNE_CACHE", str(path))
    autotune.reset()
    yield path
    autotune.reset()


def fake_run(seconds: dict[str, float], clock: list[float], calls: list[str]):
    def run(impl: str) -> None:
        calls.append(impl)
        clock[0] += seconds[impl]
    return run


# ---- selection and the time budget, with injected timings ------------------------------------
def test_the_fastest_wins_unless_the_static_choice_is_within_the_margin():
    assert autotune.select({"native": 1.0, "bptt": 0.8}, static="native") == "bptt"
    assert autotune.select({"native": 1.0, "bptt": 0.8}, static="bptt") == "bptt"
    assert autotune.select({"native": 0.99, "bptt": 1.0}, static="bptt") == "bptt"  # 1% apart: noise
    assert autotune.select({"native": 0.90, "bptt": 1.0}, static="bptt") == "native"
    assert autotune.select({"native": 0.5, "bptt": 1.0}, static="autograd") == "native"


def test_measure_warms_up_alternates_and_takes_the_median():
    clock, calls = [0.0], []
    times = autotune.measure(["native", "bptt"], fake_run({"native": 0.2, "bptt": 0.1}, clock, calls),
                             clock=lambda: clock[0], rounds=3, max_seconds=100)
    assert calls == ["native", "bptt", "native", "bptt", "bptt", "native", "native", "bptt"]
    assert times == pytest.approx({"native": 0.2, "bptt": 0.1})


def test_measure_stops_when_its_time_is_spent():
    clock, calls = [0.0], []
    autotune.measure(["native", "bptt"], fake_run({"native": 2.0, "bptt": 1.0}, clock, calls),
                     clock=lambda: clock[0], rounds=5, max_seconds=2.5)
    assert len(calls) == 2 + 2  # the untimed pass each, then one round: 3 s > 2.5 s


# ---- the key and the cache file ----------------------------------------------------------------
def test_the_key_names_machine_torch_cell_and_bucketed_shape():
    key = autotune.make_key(torch.device("cpu"), "lstm", 2, 48, 100, 64, 256, torch.float32)
    fields = key.split("|")
    assert fields[0] == f"cpu-{torch.backends.cpu.get_cpu_capability().lower()}"
    assert fields[1:] == [f"torch{torch.__version__}", f"threads{torch.get_num_threads()}", "lstm", "L2",
                          "B64", "T128", "I64", "H256", "float32"]
    assert [autotune.bucket(n) for n in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]
    assert autotune.make_key(torch.device("cpu"), "lstm", 2, 33, 65, 64, 256, torch.float32) == key
    assert autotune.make_key(torch.device("cpu"), "lstm", 2, 48, 100, 64, 256, torch.float64) != key


def decide(key="k|x|y|lstm|L1|B1|T1|I1|H1|float32", seconds=None, static="native"):
    clock, calls = [0.0], []
    run = fake_run(seconds or {"native": 1.0, "bptt": 0.5}, clock, calls)
    return autotune.choose(key, ["native", "bptt"], static, run, clock=lambda: clock[0]), calls


def test_a_decision_is_cached_on_disk_and_not_measured_again(fresh_cache):
    decision, calls = decide()
    assert decision.impl == "bptt" and decision.source == "measured" and calls
    saved = json.loads(fresh_cache.read_text())
    assert saved["torch"] == torch.__version__ and saved["entries"][next(iter(saved["entries"]))]["impl"] == "bptt"
    autotune.reset()  # a new process
    again, calls = decide(seconds={"native": 0.1, "bptt": 9.0})
    assert (again.impl, again.source, calls) == ("bptt", "cache", [])


@pytest.mark.parametrize("content", ["{not json", '["a list"]', '{"version": 1}'])
def test_a_corrupt_cache_warns_then_measures_again(fresh_cache, content):
    fresh_cache.write_text(content)
    with pytest.warns(UserWarning, match="cannot read the autotune cache .*measuring again"):
        decision, calls = decide()
    assert decision.source == "measured" and calls
    assert json.loads(fresh_cache.read_text())["entries"]  # replaced by a good one


def test_an_unreadable_cache_warns_then_measures_again(fresh_cache):
    fresh_cache.mkdir()  # a folder where the file should be: reading fails
    with pytest.warns(UserWarning) as record:
        decision, calls = decide()
    messages = [str(w.message) for w in record]
    assert any("cannot read the autotune cache" in m for m in messages), messages
    assert decision.impl == "bptt" and calls


def test_a_cache_of_another_torch_version_warns_then_measures_again(fresh_cache):
    fresh_cache.write_text(json.dumps({"version": autotune.CACHE_VERSION, "torch": "1.0.0", "entries": {
        "k|x|y|lstm|L1|B1|T1|I1|H1|float32": {"impl": "native", "seconds": {}}}}))
    with pytest.warns(UserWarning, match="written by torch 1.0.0"):
        decision, calls = decide()
    assert (decision.impl, decision.source) == ("bptt", "measured") and calls


def test_an_unwritable_cache_folder_warns_once_and_keeps_the_decision_in_memory(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("SEQMODELS_AUTOTUNE_CACHE", str(tmp_path / "a_file" / "autotune.json"))
    autotune.reset()
    with pytest.warns(UserWarning, match="cannot write the autotune cache .*in memory only"):
        first, _ = decide()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second, calls = decide(key="k|x|y|lstm|L1|B2|T1|I1|H1|float32")  # a second key: no second warning
    assert first.impl == second.impl == "bptt" and calls
    assert decide()[0] is first  # remembered for this process


# ---- in the stack ----------------------------------------------------------------------------
def twins(**kwargs):
    torch.manual_seed(0)
    a = RecurrentStack("lstm", 8, 16, num_layers=2, dropout=0.3, **kwargs)
    b = RecurrentStack("lstm", 8, 16, num_layers=2, dropout=0.3, impl="native", autotune=False)
    b.load_state_dict(a.state_dict())
    return a, b


def test_measuring_leaves_no_trace(fresh_cache, capsys):
    """A training step of impl auto (measuring on its first pass) equals the same step through
    the implementation it chose: same outputs, gradients, Adam state and random streams."""
    a, b = twins()
    x = torch.randn(4, 12, 8)
    results = []
    for stack in (a, b):
        opt = torch.optim.Adam(stack.parameters(), lr=0.01)
        torch.manual_seed(5)
        out, (h, c) = stack(x)
        assert all(p.grad is None for p in stack.parameters()), "measuring accumulates no gradient"
        if stack is a:
            chosen = next(iter(a.auto_decisions.values())).impl
            b.impl = chosen
            assert chosen in ("native", "bptt")
        (out.sum() + h.sum()).backward()
        opt.step()
        results.append((out, [p.grad for p in stack.parameters()], [p.detach().clone() for p in stack.parameters()],
                        opt.state_dict()["state"], torch.get_rng_state()))
    (out_a, grads_a, params_a, state_a, rng_a), (out_b, grads_b, params_b, state_b, rng_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    for sa, sb in zip(state_a.values(), state_b.values()):
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=0, atol=0)
    assert torch.equal(rng_a, rng_b), "the dropout stream is where it would be without measuring"
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("impl auto:")]
    assert len(lines) == 1 and "measured" in lines[0] and "per forward+backward" in lines[0]
    a(x)[0].sum().backward()
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("impl auto:")]


def test_measuring_happens_only_for_training_with_two_candidates_and_the_option_on(fresh_cache):
    x = torch.randn(2, 5, 8)
    off = RecurrentStack("lstm", 8, 16, autotune=False)
    off(x)[0].sum().backward()
    with torch.no_grad():
        inference = RecurrentStack("lstm", 8, 16)
        inference(x)
    peephole = RecurrentStack("lstm", 8, 16, peephole=True)  # no native op: bptt, nothing to compare
    peephole(x)[0].sum().backward()
    gru = RecurrentStack("gru", 8, 16)  # its hand-written BPTT has no CPU fast path: native
    gru(x)[0].sum().backward()
    fixed = RecurrentStack("lstm", 8, 16, impl="native")
    fixed(x)[0].sum().backward()
    assert not any(s.auto_decisions for s in (off, inference, peephole, gru, fixed))
    assert not fresh_cache.exists()
    on = RecurrentStack("rnn", 8, 16)
    on(x)[0].sum().backward()
    assert len(on.auto_decisions) == 1 and fresh_cache.exists()


def test_the_choice_reaches_the_loggers(tmp_path):
    """A fit with impl auto logs model.impl_chosen beside the config (CSVLogger's hparams.yaml)."""
    import yaml
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    from data_modules import SumsDataModule
    from seqmodels.tasks import SumsRegressor
    from seqmodels.tasks.base import Network

    model = SumsRegressor(Network(cell="lstm", hidden_size=8))
    data = SumsDataModule(seq_len=6, train_size=64, val_size=16, test_size=16, batch_size=16)
    trainer = Trainer(max_steps=2, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, data)
    logged = yaml.safe_load(next(tmp_path.rglob("hparams.yaml")).read_text())
    assert logged["model.impl_chosen"] in ("native", "bptt")
    assert "per forward+backward" in logged["model.impl_chosen_why"]


def test_fused_loops_turned_off_warn_once_with_impl_bptt(monkeypatch):
    from seqmodels import fused

    monkeypatch.setenv("SEQMODELS_FUSED", "0")
    fused.warn_disabled.cache_clear()
    stack = RecurrentStack("lstm", 4, 8, impl="bptt")
    with pytest.warns(UserWarning, match="SEQMODELS_FUSED=0, so impl bptt runs its plain-torch reference"):
        stack(torch.randn(2, 3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stack(torch.randn(2, 3, 4))
    fused.warn_disabled.cache_clear()
