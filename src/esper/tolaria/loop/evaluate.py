"""Validation through the task: its additive sums over the validation loader, read once at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from esper.tolaria.tasks import Task, score


@dataclass(frozen=True)
class Validation:
    """One validation pass: the mean loss, the score (primary metric, higher is better) and every metric."""

    loss: float
    score: float
    metrics: dict[str, float] = field(default_factory=dict)


def evaluate(model: nn.Module, loader: Iterable[Any], task: Task, *, place: Callable[[Any], Any] | None = None,
             autocast: Callable[[], Any] | None = None) -> Validation:
    """The task's metrics over `loader`; `place` moves a batch to the model's device, `autocast` is the
    run's precision. The model is left in training mode."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for batch in loader:
                if place is not None:
                    batch = place(batch)
                if autocast is not None:
                    with autocast():
                        output = task.forward(model, batch)
                else:
                    output = task.forward(model, batch)
                for name, value in task.metric_sums(output, batch).items():
                    value = value.detach().double()
                    sums[name] = sums[name] + value if name in sums else value
    finally:
        model.train()
    names = list(sums)
    totals = dict(zip(names, torch.stack([sums[n].reshape(()) for n in names]).tolist(), strict=True)) \
        if names else {}
    metrics = task.metrics(totals) if totals else {"loss": float("nan"), task.primary_metric: float("nan")}
    return Validation(float(metrics["loss"]), score(task, metrics), {k: float(v) for k, v in metrics.items()})
