"""Bench figures of growth: what counterfactual attribution costs at a boundary."""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.data import DataLoader

from esper.kasmina import KasminaConfig, KasminaLayer
from esper.leyline import (
    SEED_OP_GERMINATE,
    SEED_OP_STABILIZE,
    SEED_OP_START_GRAFTING,
    SEED_OP_START_TRAINING,
    seed_command,
)
from esper.tolaria.bench.registry import figure
from esper.tolaria.loop.evaluate import evaluate
from esper.tolaria.tasks import ClassificationTask
from esper.tolaria.zoo import digits_cnn, digits_images


def _grown_cnn(slot: str) -> KasminaLayer:
    """examples/digits_cnn.toml's host with one seed at full strength (SHADOWING) in `slot`."""
    torch.manual_seed(0)
    model = digits_cnn(channels=[2, 4], hidden=8, dropout=0.2)
    layer = KasminaLayer(model, ["conv1.2", "conv2.2", "fc.1"], seed=0, example_input=torch.zeros(2, 1, 8, 8),
                         config=KasminaConfig(min_training_steps=0, blend_steps=1, seed_hidden=16))
    seed_id = ""
    for op in (SEED_OP_GERMINATE, SEED_OP_START_TRAINING, SEED_OP_START_GRAFTING, SEED_OP_STABILIZE):
        result = layer.apply_command(seed_command(op, issued_by="bench", target_seed_id=seed_id or slot))
        if not result.ok:
            raise RuntimeError(f"bench setup: {result.reason}")
        seed_id = result.seed_id or seed_id
        layer.on_step()  # the one-step alpha ramp completes before STABILIZE
    seeds = layer.model.get_submodule(f"kasmina_seeds.{seed_id}")
    for param in seeds.parameters():
        torch.nn.init.normal_(param, 0.0, 0.1)  # a seed that changes the output, as a trained one does
    return layer


@figure("attribution_cost_ratio", unit="validation passes", goal=1.0)
def attribution_cost_ratio(quick: bool) -> list[float]:
    """Extra time of a validation with every applied seed's attribution over a plain validation
    pass, in units of that pass: examples/digits_cnn.toml's model with a seed at full strength at
    the input stem (`conv1.2`, the worst slot: every later layer runs twice), the digits
    validation split (360 images, batch 64). Both validations run alternately in one process; each
    trial is the median of its repetitions. Goal ≤ 1.0 (one extra validation pass)."""
    torch.set_num_threads(1)
    layer = _grown_cnn("conv1.2")
    _, val = digits_images()
    loader = list(DataLoader(val, batch_size=64))
    task = ClassificationTask()
    reps, trials = (10, 3) if quick else (30, 5)
    for _ in range(3):  # warm-up of both paths
        evaluate(layer.model, loader, task)
        evaluate(layer.model, loader, task, seeds=layer)
    out: list[float] = []
    for _ in range(trials):
        plain: list[float] = []
        attributed: list[float] = []
        for _ in range(reps):
            start = time.perf_counter()
            evaluate(layer.model, loader, task)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            evaluate(layer.model, loader, task, seeds=layer)
            attributed.append(time.perf_counter() - start)
        base = statistics.median(plain)
        out.append((statistics.median(attributed) - base) / base)
    return out
