"""The task protocol: what one step computes, and how validation is scored.

A task turns (model, batch) into a scalar training loss and a batch's validation sums; the loop,
the seed losses and the aggregator only ever see the loss, so growth works for every task.

Validation is additive: `metric_sums(output, batch)` returns 0-dim tensors that are summed over
every validation batch (on the device, read once at the end, and summable across ranks), and
`metrics(sums)` turns the totals into the reported values. `metrics` must return `"loss"` (the
mean validation loss) and the `primary_metric`.

What Tolaria reports of it: `SystemStatePacket.validation_loss` is `metrics["loss"]`;
`validation_accuracy` is the task's *score*, the primary metric oriented so that higher is better
(negated when `higher_is_better` is false); `training_metrics` carries every metric as
`val.<name>`. The accuracy-drop monitor (`emergency.accuracy_drop`) compares scores, in the
primary metric's units. The built-in tasks' primary metrics all lie in [0, 1], higher is better:
accuracy, R², token accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Task(Protocol):
    """A user task implements these; `esper.tolaria.tasks.SupervisedTask` supplies the batch rules."""

    name: str
    primary_metric: str
    higher_is_better: bool

    def forward(self, model: nn.Module, batch: Any) -> Any:
        """Run the model on the batch; returns its output as the model gives it."""
        ...

    def loss(self, output: Any, batch: Any) -> torch.Tensor:
        """The scalar training loss of `output` (from `forward`) on `batch`, mean over the batch."""
        ...

    def batch_size(self, batch: Any) -> int:
        """Samples in the batch: weights micro-batches, seed losses and ranks."""
        ...

    def metric_sums(self, output: Any, batch: Any) -> dict[str, torch.Tensor]:
        """Additive validation statistics of one batch (0-dim tensors, summed over batches)."""
        ...

    def metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """The validation metrics from the summed statistics; includes "loss" and `primary_metric`."""
        ...


MEMBERS = ("name", "primary_metric", "higher_is_better", "forward", "loss", "batch_size", "metric_sums", "metrics")


def missing_members(task: object) -> list[str]:
    """The members of the Task protocol `task` lacks (for an error that names them)."""
    return [m for m in MEMBERS if not hasattr(task, m)]


def score(task: Task, metrics: Mapping[str, float]) -> float:
    """The primary metric, higher is better (what `validation_accuracy` carries)."""
    value = float(metrics[task.primary_metric])
    return value if task.higher_is_better else -value
