"""HeuristicTamiyo driving KasminaLayer on a small BatchNorm + dropout CNN on the digits 8x8 images,
without Tolaria: an empty blueprint id reaches Kasmina, which picks by the slot's shape, and the
seed goes through its whole lifecycle."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from esper.kasmina import KasminaConfig, KasminaLayer
from esper.leyline import AdaptationCommand, is_noop, system_state_packet
from esper.tamiyo import HeuristicTamiyo, TamiyoConfig

FAST = TamiyoConfig(plateau_window=1, plateau_threshold=1.0, cooldown_epochs=0, min_training_epochs=1,
                    shadow_epochs=1, probation_epochs=1, fossilize_tolerance=10.0, cull_tolerance=10.0)
"""Germinates as soon as it has two epochs of history; each stage lasts one epoch."""


class SmallCNN(nn.Module):
    """conv(1->8) + BatchNorm + ReLU [slot `conv.2`, (8, 8, 8)] -> pool -> dropout -> flat 128 -> 32 [slot `fc.2`]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool, self.drop = nn.MaxPool2d(2), nn.Dropout(0.1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.fc(self.drop(self.pool(self.conv(x))))))


@pytest.fixture()
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: threads only add contention
    yield
    torch.set_num_threads(threads)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x, torch.tensor(digits.target)


def _train_epoch(layer: KasminaLayer, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    layer.model.train()
    for start in range(0, len(x), 64):
        xb, yb = x[start:start + 64], y[start:start + 64]
        loss = F.cross_entropy(layer.model(xb), yb)
        terms = layer.own_loss_terms(lambda xb=xb, yb=yb: F.cross_entropy(layer.model(xb), yb), len(yb))
        (loss + sum((t.loss for t in terms), torch.zeros(()))).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        layer.on_step()


def _grow(epochs: int) -> tuple[KasminaLayer, list[tuple[AdaptationCommand, str]]]:
    """Train, validate, ask Tamiyo, apply: the boundary loop in miniature. Returns the layer and (command, result)."""
    x, y = _digits()
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    train, val = order[:384], order[384:640]
    torch.manual_seed(0)
    layer = KasminaLayer(SmallCNN(), ["conv.2", "fc.2"], config=KasminaConfig(min_training_steps=6, blend_steps=6),
                         example_input=x[:2])
    optimizer = torch.optim.Adam(layer.model.parameters(), lr=3e-3)
    tamiyo, log = HeuristicTamiyo(FAST), []
    for epoch in range(epochs):
        _train_epoch(layer, optimizer, x[train], y[train])
        layer.model.eval()
        with torch.no_grad():
            val_loss = F.cross_entropy(layer.model(x[val]), y[val]).item()
        layer.on_epoch_end(epoch, val_loss, 0.0)
        command = tamiyo.evaluate_epoch(system_state_packet(
            epoch=epoch, global_step=0, training_loss=val_loss, validation_loss=val_loss, validation_accuracy=0.0,
            seed_states=layer.export_seed_states()))
        result = layer.apply_command(command)
        assert result.ok, result.reason
        params = dict(layer.model.named_parameters())
        if result.added_params:
            optimizer.add_param_group({"params": [params[n] for n in result.added_params]})
        log.append((command, result.reason))
    return layer, log


def test_tamiyo_grows_a_bn_cnn_through_kasmina_with_the_blueprint_picked_by_shape(one_thread: None) -> None:
    layer, log = _grow(epochs=8)
    germinate, reason = log[1]
    assert germinate.target_seed_id == "conv.2" and germinate.seed_operation.blueprint_id == ""
    assert "conv_residual, picked by auto for shape (8, 8, 8)" in reason
    stages = [(s["seed_id"], s["slot"], s["blueprint"], s["stage"]) for s in layer.manifest()["seeds"]]
    assert stages[0] == ("seed1", "conv.2", "conv_residual", "SEED_STAGE_FOSSILIZED")
    assert not any(is_noop(c) for c, _ in log[1:7])  # one lifecycle step per epoch, none refused
    seed = layer.model.kasmina_seeds["seed1"].body
    assert torch.count_nonzero(seed[2].weight) > 0  # the seed learned before it was frozen
