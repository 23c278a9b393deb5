"""A user's own shuffled DataLoader (no positioned sampler) resumes mid-epoch exactly: the restart
rebuilds the epoch's iterator from the RNG state the epoch began with and skips the batches
already trained, so the order, and every random draw after it, are the uninterrupted run's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from esper.kasmina import KasminaLayer
from esper.tamiyo import HeuristicTamiyo
from esper.tolaria.config import config_from_dict
from esper.tolaria.loop.trainer import TolariaTrainer
from esper.tolaria.tasks import ClassificationTask


class StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, t: Any, step: int, loss: Any) -> None:
        if step == self.step:
            t.request_stop("test")


def trainer(run_dir: Path, workers: int, callbacks: tuple[Any, ...] = ()) -> TolariaTrainer:
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(240, 8, generator=gen), torch.randint(0, 3, (240,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Dropout(0.2), nn.Linear(24, 3))
    cfg = config_from_dict({"run": {"epochs": 3, "morphogenesis": False}, "lr": {"host_policy": "constant"},
                            "telemetry": {"jsonl": False}, "emergency": {"broadcast": False},
                            "boundary": {"total_ms": 1e6, "state_assembly_ms": 1e6, "tamiyo_ms": 1e6,
                                         "apply_ms": 1e6, "check_ms": 1e6}})
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, num_workers=workers)
    return TolariaTrainer(kasmina=KasminaLayer(model, ["1"]), tamiyo=HeuristicTamiyo(), task=ClassificationTask(),
                          optimizer=lambda g: torch.optim.SGD(g, lr=0.1), train_loader=train,
                          val_loader=DataLoader(TensorDataset(x[:64], y[:64]), batch_size=64), config=cfg,
                          run_dir=run_dir, callbacks=callbacks)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shuffled_user_loader_resumes_mid_epoch_bit_exactly(tmp_path: Path, workers: int) -> None:
    reference = trainer(tmp_path / "ref", workers).fit().summary
    trainer(tmp_path / "run", workers, callbacks=(StopAt(22),)).fit()  # epoch 1, batch 7 of 15
    resumed = trainer(tmp_path / "run", workers)
    resumed.resume_from(tmp_path / "run" / "checkpoints")
    assert resumed.state.batch_in_epoch == 7
    summary = resumed.fit().summary
    assert summary["final_state_sha256"] == reference["final_state_sha256"]
