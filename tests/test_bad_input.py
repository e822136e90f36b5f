"""Bad input, through the CLI: one line on stderr that says what is wrong and how to fix it,
exit code 2, nothing written, and no existing checkpoint altered."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from seqmodels.cli import main
from tests.conftest import ROOT

SUMS = str(ROOT / "configs" / "sums_lstm.yaml")
TEXT = str(ROOT / "configs" / "shakespeare_rnn.yaml")
TINY_SUMS = ["--data.init_args.train_size=64", "--data.init_args.val_size=32", "--data.init_args.test_size=16",
             "--data.init_args.test_lengths=[5]", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"]

HYPERPARAMETERS = {
    "--data.init_args.seq_len=0": "data.seq_len must be an integer >= 1, got 0",
    "--model.init_args.network.hidden_size=0": "model.network.hidden_size must be an integer >= 1, got 0",
    "--model.init_args.network.num_layers=0": "model.network.num_layers must be an integer >= 1, got 0",
    "--model.init_args.network.dropout=1.0": "model.network.dropout must be in [0, 1), got 1.0",
    "--model.init_args.network.dropout=-0.1": "model.network.dropout must be in [0, 1), got -0.1",
    "--model.init_args.network.cell=gru2": "model.network.cell: must be one of ['rnn', 'lstm', 'gru', 'rru'], got 'gru2'",
    "--model.init_args.network.nonlinearity=relu": "model.network.nonlinearity: 'relu' does not apply to cell: lstm (its options: forget_bias, peephole)",
    "--data.init_args.test_lengths=[]": "data.test_lengths must list at least one length",
    "--model.init_args.network.nonlinearity=sigmoid": "model.network.nonlinearity: must be one of ['tanh', 'relu'], got 'sigmoid'",
    "--model.init_args.network.impl=fast": "model.network.impl must be one of ['auto', 'torch', 'cpp', 'reference', 'autograd', 'triton'], got 'fast'",
    "--model.init_args.network.recurrent_init=zeros": "model.network.recurrent_init: must be one of",
    '--lr_scheduler={"class_path": "seqmodels.schedules.WarmupCosineLR", "init_args": {"warmup_steps": -1}}':
        "lr_scheduler.warmup_steps must be >= 0, got -1",
    '--lr_scheduler={"class_path": "seqmodels.schedules.WarmupCosineLR", "init_args": {"final_fraction": 2}}':
        "lr_scheduler.final_fraction is a fraction of the peak lr, in [0, 1]; got 2",
    "--model.init_args.hiden_size=3": "model: Option 'hiden_size' is not accepted",
    "--model.init_args.network.hidden_size=abc": "model.network.hidden_size: Expected a <class 'int'>",
    "--trainer.no_such_option=1": "unrecognized arguments: --trainer.no_such_option",
    "--config=no_such_config.yaml": "config: File does not exist",
}


def one_error_line(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def run_failing(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return one_error_line(capsys)


@pytest.mark.parametrize("arg", list(HYPERPARAMETERS))
def test_impossible_or_unknown_settings(arg, in_tmp_dir, capsys):
    assert HYPERPARAMETERS[arg] in run_failing(["fit", "--config", SUMS, arg], capsys)
    assert not list(in_tmp_dir.iterdir()), "nothing may be written before the error"


def fit_in(folder, *args: str) -> None:
    """A tiny sums fit run from inside ``folder`` (the working directory restored after)."""
    import os

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        main(["fit", "--config", SUMS, *TINY_SUMS, *args])
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny sums run and its last checkpoint (made once for this module)."""
    folder = tmp_path_factory.mktemp("trained")
    fit_in(folder, "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir=runs")
    (ckpt,) = folder.rglob("last.ckpt")
    return ckpt


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bad_checkpoints(trained, tmp_path):
    (tmp_path / "random.ckpt").write_bytes(b"\x00\x01 not a checkpoint" * 100)
    (tmp_path / "truncated.ckpt").write_bytes(trained.read_bytes()[:4000])
    (tmp_path / "empty.ckpt").write_bytes(b"")
    import torch

    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.ckpt")
    return {
        "random.ckpt": "cannot read checkpoint",
        "truncated.ckpt": "is truncated, corrupt or not a checkpoint",
        "empty.ckpt": "cannot read checkpoint",
        "plain.ckpt": "is not a Lightning checkpoint (no state_dict)",
        "missing.ckpt": "does not exist",
    }


@pytest.mark.parametrize("subcommand", ["test", "fit"])
@pytest.mark.slow
def test_corrupt_truncated_or_missing_checkpoints(subcommand, trained, in_tmp_dir, capsys):
    before = digest(trained)
    for name, message in bad_checkpoints(trained, in_tmp_dir).items():
        line = run_failing([subcommand, "--config", SUMS, *TINY_SUMS, f"--ckpt_path={in_tmp_dir / name}"], capsys)
        assert message in line and "pass a .ckpt written by fit" in line or "no state_dict" in line, line
    assert not (in_tmp_dir / "runs").exists()
    assert digest(trained) == before


@pytest.mark.slow
def test_checkpoint_of_another_size_cell_or_task(trained, in_tmp_dir, capsys):
    before = digest(trained)
    line = run_failing(["test", "--config", SUMS, *TINY_SUMS, "--model.init_args.network.hidden_size=7",
                        f"--ckpt_path={trained}"], capsys)
    assert "trained with another cell or other sizes" in line and "(128, 1)" in line
    line = run_failing(["test", "--config", str(ROOT / "configs" / "sums_rnn.yaml"), *TINY_SUMS,
                        f"--ckpt_path={trained}"], capsys)
    assert "another cell or other sizes" in line
    corpus = in_tmp_dir / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 200)
    line = run_failing(["sample", "--config", TEXT, f"--data.init_args.path={corpus}", f"--ckpt_path={trained}",
                        f"--data.init_args.cache_dir={in_tmp_dir / 'cache'}"], capsys)
    assert "was written by another model or task" in line
    assert digest(trained) == before


def test_unwritable_output_folder(in_tmp_dir, capsys):
    (in_tmp_dir / "a_file").write_text("in the way")
    line = run_failing(["fit", "--config", SUMS, *TINY_SUMS, "--trainer.logger.init_args.save_dir=a_file/runs"], capsys)
    assert "cannot write to a_file/runs" in line and "save_dir" in line


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10, "looks binary"),
    ("caf\xe9 cr\xe8me\n".encode("latin-1") * 50, "is not UTF-8"),
    (b"To be.\n", "shorter than one batch"),
])
def test_bad_text_files(content, message, in_tmp_dir, capsys):
    path = in_tmp_dir / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    line = run_failing(["fit", "--config", TEXT, f"--data.init_args.path={path}",
                        f"--data.init_args.cache_dir={in_tmp_dir / 'cache'}"], capsys)
    assert message in line
    assert not (in_tmp_dir / "runs").exists()


# ---- GPU settings on a machine without a GPU: a notice, then the CPU ----------------------------
GPU_TEXT = str(ROOT / "configs" / "shakespeare_lstm_gpu.yaml")
no_cuda = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the fallback without a GPU")


def notices(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err and not [l for l in err.splitlines() if l.startswith("error:")], err
    return [line for line in err.splitlines() if line.startswith("notice:")]


@no_cuda
@pytest.mark.slow
def test_gpu_config_without_a_gpu_runs_on_the_cpu_with_a_notice(in_tmp_dir, capsys):
    corpus = in_tmp_dir / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 200)
    cli = main(["fit", "--config", GPU_TEXT, f"--data.init_args.path={corpus}", "--trainer.max_steps=2",
                "--model.init_args.network.hidden_size=8", "--model.init_args.network.num_layers=1", "--data.init_args.batch_size=4",
                "--data.init_args.eval_batch_size=4", "--data.init_args.bptt=16", "--trainer.val_check_interval=2",
                f"--data.init_args.cache_dir={in_tmp_dir / 'cache'}", "--trainer.enable_progress_bar=false",
                "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir=runs"])
    (line,) = notices(capsys)
    assert "asks for a GPU" in line and "training on the CPU" in line
    assert cli.trainer.global_step == 2 and cli.model.device.type == "cpu"
    assert list(in_tmp_dir.rglob("last.ckpt")), "the run saved its work as usual"


@pytest.mark.slow
def test_peephole_overlay_turns_the_gpu_config_into_a_peephole_lstm(in_tmp_dir, capsys):
    """configs/peephole.yaml after the GPU config: the same run with peepholes (the end-to-end
    figure of the GPU kernels), which impl auto trains with the hand-written BPTT."""
    corpus = in_tmp_dir / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 200)
    cli = main(["fit", "--config", GPU_TEXT, "--config", str(ROOT / "configs" / "peephole.yaml"),
                f"--data.init_args.path={corpus}", "--trainer.max_steps=2", "--trainer.accelerator=cpu",
                "--model.init_args.network.hidden_size=8", "--model.init_args.network.num_layers=1",
                "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=4", "--data.init_args.bptt=16",
                "--trainer.val_check_interval=2", f"--data.init_args.cache_dir={in_tmp_dir / 'cache'}",
                "--trainer.enable_progress_bar=false", "--trainer.precision=32-true",
                "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir=runs"])
    stack = cli.model.stack
    assert stack.peephole and stack.cell_type == "lstm" and stack.layers[0].cell.weight_ci.requires_grad
    assert cli.model.network.impl == "auto" and cli.model.network.dropout == 0.25  # the rest: the GPU config's
    assert cli.trainer.global_step == 2


@no_cuda
@pytest.mark.slow
def test_float16_mixed_precision_on_the_cpu_falls_back_to_32_true(in_tmp_dir, capsys):
    cli = main(["fit", "--config", SUMS, *TINY_SUMS, "--trainer.precision=16-mixed", "--trainer.accelerator=cpu",
                "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir=runs"])
    (line,) = notices(capsys)
    assert "16-mixed needs a CUDA GPU" in line and "32-true" in line
    assert cli.trainer.precision == "32-true" and cli.trainer.global_step > 0


def test_divergence_guard_leaves_non_finite_gradients_to_a_loss_scaler():
    """Under 16-mixed the GradScaler skips a step whose gradients overflowed and lowers the
    scale: normal in the first steps, not divergence. Without a scaler they stop the run."""
    from types import SimpleNamespace

    import torch

    from seqmodels.errors import TrainingDiverged
    from seqmodels.guards import DivergenceGuard

    module = torch.nn.Linear(2, 2)
    module.weight.grad = torch.full((2, 2), float("inf"))
    module.bias.grad = torch.zeros(2)
    scaled = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()), global_step=3,
                             gradient_clip_val=1.0, checkpoint_callbacks=[])
    DivergenceGuard().on_before_optimizer_step(scaled, module, None)  # no error
    plain = SimpleNamespace(precision_plugin=SimpleNamespace(), global_step=3, gradient_clip_val=1.0,
                            checkpoint_callbacks=[])
    with pytest.raises(TrainingDiverged, match="the gradient of weight is not finite"):
        DivergenceGuard().on_before_optimizer_step(plain, module, None)


@pytest.mark.parametrize("subcommand", ["sample", "test"])
def test_ckpt_path_last_without_any_run_is_one_line(subcommand, in_tmp_dir, capsys):
    line = run_failing([subcommand, "--config", SUMS, *([] if subcommand == "sample" else TINY_SUMS),
                        "--ckpt_path=last"], capsys)
    assert "--ckpt_path last: no last.ckpt under runs/seqmodels/*/checkpoints yet; train first" in line
    assert not (in_tmp_dir / "runs").exists()


@pytest.mark.slow
def test_predict_writes_beside_the_checkpoint_and_refuses_another_tasks(trained, in_tmp_dir, capsys):
    import numpy as np

    main(["predict", "--config", SUMS, *TINY_SUMS, f"--ckpt_path={trained}",
          "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir=runs"])
    saved = np.load(trained.parents[1] / "predictions.npz")
    assert saved["y_hat_len_5"].shape == saved["y_len_5"].shape == (16, 1)  # test_size sequences of length 5
    corpus = in_tmp_dir / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 200)
    line = run_failing(["predict", "--config", TEXT, f"--data.init_args.path={corpus}", f"--ckpt_path={trained}",
                        f"--data.init_args.cache_dir={in_tmp_dir / 'cache'}"], capsys)
    assert "was written by another model or task" in line


# ---- the frameworks' errors while the run is built: one line too -------------------------------
CSV = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir=runs"]
EARLY_STOPPING = ["--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
                  "--trainer.callbacks.monitor=val/loss", "--trainer.callbacks.mode=foo"]
# raised by Lightning, torch.optim or (through jsonargparse) a callback while the objects are made
FRAMEWORK_ERRORS = {
    ("--trainer.max_epochs=-5",):
        "error: trainer.max_epochs: `max_epochs` must be a non-negative integer or -1. You passed in -5.",
    ("--optimizer.init_args.lr=-1",):
        "error: optimizer: Invalid learning rate: -1.0 (in torch.optim.Adam; see `--optimizer.help torch.optim.Adam`)",
    ("--optimizer.init_args.weight_decay=-1",): "error: optimizer.weight_decay: Invalid weight_decay value: -1.0",
    ("--trainer.accelerator=foo",):
        "error: trainer.accelerator: You selected an invalid accelerator name: `accelerator='foo'`",
    tuple(EARLY_STOPPING):
        "error: trainer.callbacks.mode: `mode` can be min, max, got foo (in lightning.pytorch.callbacks.EarlyStopping",
}
# raised inside trainer.fit, by configure_optimizers or Lightning's loop set-up (after the run's
# folder and config are written, before the first training batch)
FIT_ERRORS = {
    "--lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau":
        "error: MisconfigurationException: `configure_optimizers` must include a monitor when a `ReduceLROnPlateau`",
    "--trainer.val_check_interval=1000": "error: trainer.val_check_interval: `val_check_interval` (1000) must be "
                                         "less than or equal to the number of the training batches (1)",
}


def one_line_without_traceback(args, capsys, notes: tuple[str, ...] = ()) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(note in err for note in notes), err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("args", list(FRAMEWORK_ERRORS), ids=lambda args: args[-1])
def test_framework_errors_while_building_are_one_line(args, in_tmp_dir, capsys):
    line = one_line_without_traceback(["fit", "--config", SUMS, *TINY_SUMS, *args], capsys)
    assert line.startswith(FRAMEWORK_ERRORS[args]), line
    assert not list(in_tmp_dir.iterdir()), "nothing may be written before the error"


@pytest.mark.parametrize("arg", list(FIT_ERRORS))
@pytest.mark.slow
def test_framework_errors_inside_fit_before_the_first_batch_are_one_line(arg, in_tmp_dir, capsys):
    line = one_line_without_traceback(["fit", "--config", SUMS, *TINY_SUMS, *CSV, arg], capsys)
    assert line.startswith(FIT_ERRORS[arg]), line
    assert not list(in_tmp_dir.rglob("*.ckpt"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny sums run with the configs' own logger (W&B, offline): its ``runs`` folder."""
    import wandb

    folder = tmp_path_factory.mktemp("trained_run")
    try:
        fit_in(folder)
    finally:
        wandb.finish()
        wandb.teardown()
    return folder / "runs"


@pytest.mark.parametrize("arg", list(FIT_ERRORS))
@pytest.mark.slow
def test_a_resume_that_fails_while_building_keeps_the_run_as_it_was(arg, trained_run, in_tmp_dir, capsys):
    """--ckpt_path last continues in the run's own folder: its checkpoints and config stay."""
    import shutil

    shutil.copytree(trained_run, in_tmp_dir / "runs", symlinks=True)
    (run,) = (in_tmp_dir / "runs" / "seqmodels").iterdir()
    saved = {path: digest(path) for path in run.rglob("*") if path.is_file()}
    assert run / "cli_config.yaml" in saved and run / "checkpoints" / "last.ckpt" in saved
    resuming = f"resuming from {Path('runs') / 'seqmodels' / run.name / 'checkpoints' / 'last.ckpt'}"
    line = one_line_without_traceback(["fit", "--config", SUMS, *TINY_SUMS, "--ckpt_path=last", arg], capsys,
                                      notes=(resuming,))
    assert line.startswith(FIT_ERRORS[arg]), line
    assert {path: digest(path) for path in run.rglob("*") if path.is_file()} == saved


@pytest.mark.parametrize("arg,message", [
    ("--trainer.max_epochs", "error: trainer.max_epochs: `max_epochs` must be a non-negative integer or -1. You "
                             "passed in -5."),
    ("--optimizer.init_args.lr", "error: optimizer: Invalid learning rate: -5.0 (in torch.optim.Adam; see "),
], ids=["max_epochs", "lr"])
@pytest.mark.slow  # a fresh process each; test_framework_errors_while_building_are_one_line has the same in-process
def test_framework_errors_as_a_new_user_types_them(arg, message, tmp_path):
    """`python cli.py fit --config ... --trainer.max_epochs -5`: one line, exit code 2, no traceback."""
    import subprocess
    import sys

    from tests.conftest import fresh_user_env

    run = subprocess.run([sys.executable, str(ROOT / "cli.py"), "fit", "--config", SUMS, arg, "-5"], cwd=tmp_path,
                         env=fresh_user_env(tmp_path), capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    (line,) = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(message), line
    assert not list(tmp_path.glob("runs")), "nothing may be written before the error"


def test_python_dev_mode_shows_a_frameworks_traceback(in_tmp_dir, monkeypatch):
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from seqmodels import cli

    monkeypatch.setattr(cli, "show_framework_tracebacks", lambda: True)  # python -X dev
    with pytest.raises(MisconfigurationException, match="max_epochs"):
        main(["fit", "--config", SUMS, *TINY_SUMS, "--trainer.max_epochs=-5"])


def _torch_rejects(*args, **kwargs):
    import torch

    torch.optim.SGD([], lr=0.1)  # torch raises ValueError: optimizer got an empty parameter list


def _project_bug(*args, **kwargs):
    raise ValueError("optimizer got an empty parameter list")


@pytest.mark.parametrize("where,raises", [
    ("seqmodels.tasks.SumsRegressor.training_step", _torch_rejects),      # the first training batch
    ("seqmodels.tasks.SumsRegressor.validation_step", _torch_rejects),    # the sanity check's first batch
    ("data_modules.SumsDataModule.setup", _project_bug),                  # while building, but our own code
], ids=["training_step", "sanity_check", "project_code"])
def test_crashes_after_the_build_and_bugs_of_our_own_keep_their_traceback(where, raises, in_tmp_dir, monkeypatch,
                                                                          capsys):
    monkeypatch.setattr(where, raises)
    with pytest.raises(ValueError, match="empty parameter list"):
        main(["fit", "--config", SUMS, *TINY_SUMS, *CSV])
    assert "error:" not in capsys.readouterr().err
