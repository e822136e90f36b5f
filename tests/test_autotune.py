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
    path = tmp_path / "seqmodels" / "autotune.json"
    path.parent.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    autotune.reset()
    yield path
    autotune.reset()


def fake_run(seconds: dict[str, float], clock: list[float], calls: list[str]):
    def run(impl: str) -> None:
        calls.append(impl)
        clock[0] += seconds[impl]
    return run


# ---- selection and the time budget, with injected timings ------------------------------------
def test_the_fastest_wins_unless_the_first_candidate_is_within_the_margin():
    assert autotune.select({"torch": 1.0, "cpp": 0.8}, first="torch") == "cpp"
    assert autotune.select({"torch": 1.0, "cpp": 0.8}, first="cpp") == "cpp"
    assert autotune.select({"torch": 0.99, "cpp": 1.0}, first="cpp") == "cpp"  # 1% apart: noise
    assert autotune.select({"torch": 0.90, "cpp": 1.0}, first="cpp") == "torch"
    assert autotune.select({"torch": 0.5, "cpp": 1.0}, first="autograd") == "torch"


def test_measure_warms_up_alternates_and_takes_the_median():
    clock, calls = [0.0], []
    times = autotune.measure(["torch", "cpp"], fake_run({"torch": 0.2, "cpp": 0.1}, clock, calls),
                             clock=lambda: clock[0], rounds=3, max_seconds=100)
    assert calls == ["torch", "cpp", "torch", "cpp", "cpp", "torch", "torch", "cpp"]
    assert times == pytest.approx({"torch": 0.2, "cpp": 0.1})


def test_measure_stops_when_its_time_is_spent():
    clock, calls = [0.0], []
    autotune.measure(["torch", "cpp"], fake_run({"torch": 2.0, "cpp": 1.0}, clock, calls),
                     clock=lambda: clock[0], rounds=5, max_seconds=2.5)
    assert len(calls) == 2 + 2  # the untimed pass each, then one round: 3 s > 2.5 s


# ---- the key and the cache file ----------------------------------------------------------------
def test_the_key_names_machine_torch_cell_and_bucketed_shape():
    key = autotune.make_key(torch.device("cpu"), "lstm", True, 2, 48, 100, 64, 256, torch.float32)
    fields = key.split("|")
    assert fields[0] == f"cpu-{torch.backends.cpu.get_cpu_capability().lower()}"
    assert fields[1:] == [f"torch{torch.__version__}", f"threads{torch.get_num_threads()}", "lstm", "train", "L2",
                          "B64", "T128", "I64", "H256", "float32"]
    assert [autotune.bucket(n) for n in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]
    assert autotune.make_key(torch.device("cpu"), "lstm", True, 2, 33, 65, 64, 256, torch.float32) == key
    assert autotune.make_key(torch.device("cpu"), "lstm", True, 2, 48, 100, 64, 256, torch.float64) != key
    assert autotune.make_key(torch.device("cpu"), "lstm", False, 2, 48, 100, 64, 256, torch.float32) != key
    assert autotune.describe(key) == f"train B≤64 T≤128 on {fields[0]}"


def decide(key="k|x|y|lstm|train|L1|B1|T1|I1|H1|float32", seconds=None, static="torch"):
    clock, calls = [0.0], []
    run = fake_run(seconds or {"torch": 1.0, "cpp": 0.5}, clock, calls)
    return autotune.choose(key, ["torch", "cpp"], static, run, clock=lambda: clock[0]), calls


def test_a_decision_is_cached_on_disk_and_not_measured_again(fresh_cache):
    decision, calls = decide()
    assert decision.impl == "cpp" and decision.source == "measured" and calls
    saved = json.loads(fresh_cache.read_text())
    assert saved["torch"] == torch.__version__ and saved["entries"][next(iter(saved["entries"]))]["impl"] == "cpp"
    autotune.reset()  # a new process
    again, calls = decide(seconds={"torch": 0.1, "cpp": 9.0})
    assert (again.impl, again.source, calls) == ("cpp", "cached", [])


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
    assert decision.impl == "cpp" and calls


def test_a_cache_of_another_torch_version_warns_then_measures_again(fresh_cache):
    fresh_cache.write_text(json.dumps({"version": autotune.CACHE_VERSION, "torch": "1.0.0", "entries": {
        "k|x|y|lstm|train|L1|B1|T1|I1|H1|float32": {"impl": "torch", "seconds": {}}}}))
    with pytest.warns(UserWarning, match="written by torch 1.0.0"):
        decision, calls = decide()
    assert (decision.impl, decision.source) == ("cpp", "measured") and calls


def test_an_unwritable_cache_folder_warns_once_and_keeps_the_decision_in_memory(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a_file"))
    autotune.reset()
    with pytest.warns(UserWarning, match="cannot write the autotune cache .*in memory only"):
        first, _ = decide()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second, calls = decide(key="k|x|y|lstm|train|L1|B2|T1|I1|H1|float32")  # a second key: no second warning
    assert first.impl == second.impl == "cpp" and calls
    assert decide()[0] is first  # remembered for this process


# ---- in the stack ----------------------------------------------------------------------------
def twins(**kwargs):
    torch.manual_seed(0)
    a = RecurrentStack("lstm", 8, 16, num_layers=2, dropout=0.3, **kwargs)
    b = RecurrentStack("lstm", 8, 16, num_layers=2, dropout=0.3, impl="torch", autotune=False)
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
            chosen = next(iter(a.backends.values()))
            assert chosen.source == "measured" and chosen.backend in ("torch", "cpp")
            b.impl = chosen.backend
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
    lines = [line for line in capsys.readouterr().err.splitlines() if "impl: auto" in line]
    assert len(lines) == 1 and "measured" in lines[0] and "per pass" in lines[0], lines
    a(x)[0].sum().backward()
    assert not [line for line in capsys.readouterr().err.splitlines() if "impl: auto" in line]


def test_measuring_happens_only_with_two_candidates_and_the_option_on(fresh_cache):
    x = torch.randn(2, 5, 8)
    off = RecurrentStack("lstm", 8, 16, autotune=False)
    off(x)[0].sum().backward()
    peephole = RecurrentStack("lstm", 8, 16, peephole=True)  # no torch op: cpp alone
    peephole(x)[0].sum().backward()
    gru = RecurrentStack("gru", 8, 16)  # no C++ loops: torch's op alone
    gru(x)[0].sum().backward()
    fixed = RecurrentStack("lstm", 8, 16, impl="torch")
    fixed(x)[0].sum().backward()
    assert [next(iter(s.backends.values())).source for s in (off, peephole, gru, fixed)] == ["rule"] * 3 + ["asked"]
    assert [next(iter(s.backends.values())).backend for s in (off, peephole, gru)] == ["torch", "cpp", "torch"]
    assert not fresh_cache.exists()
    on = RecurrentStack("rnn", 8, 16)
    on(x)[0].sum().backward()
    with torch.no_grad():
        on(x)  # inference is measured too, under its own key
    assert [c.source for c in on.backends.values()] == ["measured", "measured"] and fresh_cache.exists()
    assert sorted(k.split("|")[4] for k in on.backends) == ["infer", "train"]


def test_a_candidate_that_fails_while_measured_is_dropped_with_one_line(fresh_cache, monkeypatch, capsys):
    from seqmodels.registry import CELLS

    def broken(*args, **kwargs):
        raise RuntimeError("illegal memory access\nsecond line")

    monkeypatch.setitem(CELLS["lstm"].layers, "cpp", broken)
    stack = RecurrentStack("lstm", 8, 16)
    out, _ = stack(torch.randn(2, 5, 8))  # the run goes on, on the candidate left
    out.sum().backward()
    assert next(iter(stack.backends.values())).backend == "torch"
    dropped = [line for line in capsys.readouterr().err.splitlines() if "dropped" in line]
    assert dropped == ["impl auto: dropped cpp while measuring (RuntimeError: illegal memory access)"]
    monkeypatch.setitem(CELLS["lstm"].layers, "cpp", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):  # every candidate fails: the first error
        autotune.measure(["cpp"], lambda impl: broken())


def test_the_choice_reaches_the_loggers(tmp_path):
    """A fit logs model.backend beside the config (CSVLogger's hparams.yaml)."""
    import yaml
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    from data_modules import SumsDataModule
    from seqmodels.tasks import SumsRegressor
    from seqmodels.tasks.base import NetworkConfig

    model = SumsRegressor(NetworkConfig(cell="lstm", hidden_size=8))
    data = SumsDataModule(seq_len=6, train_size=64, val_size=16, test_size=16, batch_size=16)
    trainer = Trainer(max_steps=2, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, data)
    logged = yaml.safe_load(next(tmp_path.rglob("hparams.yaml")).read_text())
    assert logged["model.backend"] in ("torch", "cpp")
    assert "per pass" in logged["model.backend_why"] or "cached" in logged["model.backend_why"]


def test_compiled_code_turned_off_runs_the_reference_after_one_line(monkeypatch):
    from seqmodels import backends, fused

    monkeypatch.setenv("SEQMODELS_COMPILED", "0")
    backends._notice.cache_clear()
    stack = RecurrentStack("lstm", 4, 8, impl="cpp")
    with pytest.warns(UserWarning, match=r"impl: cpp cannot run here \(SEQMODELS_COMPILED=0 turns compiled code off\); "
                                         r"running reference"):
        stack(torch.randn(2, 3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stack(torch.randn(2, 3, 4))
    assert fused.loops() is None and next(iter(stack.backends.values())).backend == "reference"
    assert RecurrentStack("lstm", 4, 8)(torch.randn(2, 3, 4)) is not None  # auto: torch's op, no C++ candidate
    backends._notice.cache_clear()
