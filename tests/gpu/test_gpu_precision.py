"""fp16 with a GradScaler and bf16 autocast train on CUDA: the model stays on the GPU in fp32
master weights, the loss falls, and fp16's scaler state is live."""

from __future__ import annotations

import pytest
import torch

from esper.tolaria.loop.build import build_trainer
from gpu.jobs import cuda_config

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_on_cuda(precision: str) -> None:
    trainer = build_trainer(cuda_config(run={"epochs": 5, "precision": precision}))
    result = trainer.fit()
    history = result.summary["history"]
    assert all(p.is_cuda and p.dtype == torch.float32 for p in trainer.model.parameters())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert result.final_val_accuracy > 0.6  # ten digit classes: chance is 0.1
    prec = result.summary["precision"]
    assert prec["precision"] == precision and prec["device"].startswith("cuda")
    if precision == "fp16":
        assert prec["loss_scale"] is not None and prec["loss_scale"] > 0
    else:
        assert prec["loss_scale"] is None
