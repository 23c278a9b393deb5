"""A user's task class named by import path: the documented protocol, options from [task_options],
and a lower-is-better primary metric carried as a negated score."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from esper.tolaria.cli import main

MODULE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


class MeanAbsoluteError:
    """Protocol only, no base class: L1 loss, primary metric MAE (lower is better)."""

    name, primary_metric, higher_is_better = "mae", "mae", False

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def forward(self, model, batch):
        return model(batch[0])

    def loss(self, output, batch):
        return self.scale * (output.squeeze(1) - batch[1]).abs().mean()

    def batch_size(self, batch):
        return len(batch[1])

    def metric_sums(self, output, batch):
        err = (output.squeeze(1) - batch[1]).abs()
        return {"abs": err.sum(), "n": torch.tensor(float(len(err)))}

    def metrics(self, sums):
        mae = sums["abs"] / sums["n"]
        return {"loss": self.scale * mae, "mae": mae}


def model():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))


def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=gen)
    y = x.sum(1)
    return TensorDataset(x[:320], y[:320]), TensorDataset(x[320:], y[320:])
'''

CONFIG = '''
task = "usertask:MeanAbsoluteError"
[task_options]
scale = 2.0
[run]
epochs = 4
morphogenesis = false
[model]
factory = "usertask:model"
slots = ["1"]
[data]
factory = "usertask:data"
batch_size = 32
'''


def test_a_user_task_by_import_path_trains_and_reports_its_metric(tmp_path: Path) -> None:
    (tmp_path / "usertask.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "job.toml").write_text(CONFIG)
    run = tmp_path / "run"
    assert main(["run", str(tmp_path / "job.toml"), "--run-dir", str(run), "--quiet", "--no-report"]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["task"] == {"name": "mae", "primary_metric": "mae", "higher_is_better": False}
    metrics = s["final_val_metrics"]
    assert s["final_val_accuracy"] == -metrics["mae"], "a lower-is-better metric is carried negated"
    assert s["final_val_loss"] == pytest.approx(2.0 * metrics["mae"]), "task_options reached the task"
    first, last = s["history"][0]["val_metrics"]["mae"], metrics["mae"]
    assert last < first


def test_a_task_class_missing_part_of_the_protocol_is_named(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # another module name: the first test's `usertask` is imported in this process already
    (tmp_path / "halftask.py").write_text(textwrap.dedent(MODULE) + "\nclass Half:\n    name = 'half'\n")
    (tmp_path / "job.toml").write_text(CONFIG.replace("usertask:MeanAbsoluteError", "halftask:Half")
                                       .replace("usertask:", "halftask:").replace("scale = 2.0", ""))
    run = tmp_path / "run"
    assert main(["run", str(tmp_path / "job.toml"), "--run-dir", str(run), "--quiet", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "task" in err and "primary_metric" in err and "metric_sums" in err and "Traceback" not in err
    assert not run.exists()
