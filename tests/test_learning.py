"""It really learns: configs/sums_lstm.yaml, unchanged, ends with val MSE at length 20
below 1% of the target variance (Var Σ_{t≤20} U(-1, 1) = 20/3)."""
from __future__ import annotations

import pytest

from seqmodels.cli import main
from tests.conftest import ROOT


@pytest.mark.slow
def test_sums_lstm_config_learns(in_tmp_dir):
    cli = main(["fit", "--config", str(ROOT / "configs" / "sums_lstm.yaml"),
                "--trainer.enable_progress_bar=false"])
    val_mse = float(cli.trainer.callback_metrics["val/mse"])
    variance = cli.datamodule.target_variance
    assert abs(variance - 20 / 3) < 1e-9
    assert val_mse < 0.01 * variance, f"val/mse {val_mse:.4f} >= 1% of the target variance {variance:.3f}"
