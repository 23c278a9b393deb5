"""Helpers for Kasmina tests: a small MLP host, a layer on it, and a driver that walks a seed through stages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from esper.kasmina import KasminaConfig, KasminaLayer
from esper.leyline import (
    SEED_OP_CULL,
    SEED_OP_FINE_TUNE,
    SEED_OP_FOSSILIZE,
    SEED_OP_GERMINATE,
    SEED_OP_STABILIZE,
    SEED_OP_START_GRAFTING,
    SEED_OP_START_TRAINING,
    SEED_STAGE_BLENDING,
    SEED_STAGE_CULLED,
    SEED_STAGE_FOSSILIZED,
    SEED_STAGE_GERMINATED,
    SEED_STAGE_PROBATIONARY,
    SEED_STAGE_SHADOWING,
    SEED_STAGE_TRAINING,
    AdaptationCommand,
    seed_command,
)

CONFIG = KasminaConfig(min_training_steps=2, blend_steps=3, evaluation_steps=2, fossilize_tolerance=0.01,
                       seed_hidden=8, adapter_dim=4)


def make_host() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def make_layer(model: nn.Module | None = None, *, seed: int = 0, config: KasminaConfig = CONFIG) -> KasminaLayer:
    model = model if model is not None else make_host()
    return KasminaLayer(model, ["1", "3"], config=config, seed=seed, example_input=torch.zeros(2, 4))


def cmd(op: int, target: str, blueprint: str = "") -> AdaptationCommand:
    return seed_command(op, issued_by="test", target_seed_id=target, blueprint_id=blueprint)


def apply_ok(layer: KasminaLayer, op: int, target: str, blueprint: str = "") -> str:
    result = layer.apply_command(cmd(op, target, blueprint))
    assert result.ok, result.reason
    return result.seed_id


# Each stage's path from the previous one: the op to apply and what makes its gate pass first.
def drive_to(layer: KasminaLayer, stage: int, slot: str = "1", blueprint: str = "") -> str:
    """Germinate `blueprint` in `slot` and advance to `stage` by legal ops; leaves the next gate satisfied."""
    seed_id = apply_ok(layer, SEED_OP_GERMINATE, slot, blueprint)
    if stage == SEED_STAGE_CULLED:
        apply_ok(layer, SEED_OP_CULL, seed_id)
        return seed_id
    path: list[tuple[int, Callable[[], Any]]] = [
        (SEED_OP_START_TRAINING, lambda: [layer.on_step() for _ in range(CONFIG.min_training_steps)]),
        (SEED_OP_START_GRAFTING, lambda: [layer.on_step() for _ in range(CONFIG.blend_steps)]),
        (SEED_OP_STABILIZE, lambda: None),
        (SEED_OP_FINE_TUNE, lambda: layer.on_epoch_end(5, 0.9, 0.5)),
        (SEED_OP_FOSSILIZE, lambda: None),
    ]
    order = [SEED_STAGE_GERMINATED, SEED_STAGE_TRAINING, SEED_STAGE_BLENDING, SEED_STAGE_SHADOWING,
             SEED_STAGE_PROBATIONARY, SEED_STAGE_FOSSILIZED]
    layer.on_epoch_end(0, 1.0, 0.5)  # a val loss exists before grafting
    for op, prepare in path[: order.index(stage)]:
        apply_ok(layer, op, seed_id)
        prepare()
    assert layer.seed_record(seed_id).stage == stage
    return seed_id


def model_state(layer: KasminaLayer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.model.state_dict().items()}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
