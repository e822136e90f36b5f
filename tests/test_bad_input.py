"""Impossible settings fail at start-up with one line naming the parameter and the allowed values."""
from __future__ import annotations

import pytest

from seqmodels.cli import main
from tests.conftest import ROOT

CONFIG = str(ROOT / "configs" / "sums_lstm.yaml")

CASES = {
    "--data.init_args.seq_len=0": "data.seq_len must be an integer >= 1, got 0",
    "--model.init_args.hidden_size=0": "model.hidden_size must be an integer >= 1, got 0",
    "--model.init_args.num_layers=0": "model.num_layers must be an integer >= 1, got 0",
    "--model.init_args.dropout=1.0": "model.dropout must be in [0, 1), got 1.0",
    "--model.init_args.dropout=-0.1": "model.dropout must be in [0, 1), got -0.1",
    "--model.init_args.cell=gru": "model.cell must be one of ['rnn', 'lstm'], got 'gru'",
    "--data.init_args.test_lengths=[]": "data.test_lengths must list at least one length",
    "--model.init_args.nonlinearity=sigmoid": "model.nonlinearity must be one of ['tanh', 'relu']",
}


@pytest.mark.parametrize("arg", list(CASES))
def test_impossible_values_give_one_line(arg, in_tmp_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIG, arg])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and CASES[arg] in err[0], err
    assert not list(in_tmp_dir.iterdir()), "nothing may be written before the error"
