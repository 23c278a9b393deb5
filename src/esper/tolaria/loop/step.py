"""What one optimizer step computes: each micro-batch's forward (under the run's autocast), the
seeds' own losses, and the backward through the aggregator, with accumulation and loss scaling.

A step of k micro-batches weighs micro-batch i by its share of the step's samples (b_i / Σ b), so
k micro-batches of a mean loss give the gradient of one batch of Σ b. Only the last micro-batch's
backward reads the gradients (norm, non-finite check, clipping) after the scaler unscales them.
A non-finite micro-batch ends the step there: its gradients are gone and the step is skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esper.contracts import ExecutionLayer
from esper.tolaria.control.aggregation import AggregationStats, GradientAggregator
from esper.tolaria.loop.precision import Precision
from esper.tolaria.observe.profiling import Profiler
from esper.tolaria.tasks import Task

HostLoss = Callable[[Any, Any], torch.Tensor]


@dataclass(frozen=True)
class StepResult:
    """`stats.total_loss`: the step's sample-weighted loss, seeds' terms included (what the monitors
    watch); `host_loss`: the host's alone, detached and unsynced (what the epoch's mean reports)."""

    stats: AggregationStats
    rows: int
    host_loss: torch.Tensor


class StepCompute:
    """Runs the compute of one step; the trainer owns what happens to its result."""

    def __init__(self, *, model: nn.Module, task: Task, kasmina: ExecutionLayer, aggregator: GradientAggregator,
                 precision: Precision, morphogenesis: bool, profiler: Profiler,
                 optimizer: Callable[[], torch.optim.Optimizer], accumulate: int = 1) -> None:
        self.model, self.task, self.kasmina, self.aggregator = model, task, kasmina, aggregator
        self.precision, self.morphogenesis = precision, morphogenesis
        self.profiler, self.optimizer, self.accumulate = profiler, optimizer, accumulate

    def summary(self) -> dict[str, Any]:
        task = self.task
        return {"task": {"name": getattr(task, "name", type(task).__name__), "primary_metric": task.primary_metric,
                         "higher_is_better": task.higher_is_better},
                "precision": self.precision.summary(), "accumulate_steps": self.accumulate}

    def run(self, micro: Sequence[Any], params: Mapping[str, nn.Parameter], host_loss: HostLoss,
            check_grads: bool) -> StepResult:
        if len(micro) == 1:
            rows = self.task.batch_size(micro[0])
            stats, loss = self._micro(micro[0], rows, 1.0, True, params, host_loss, check_grads)
            return StepResult(stats, rows, loss)
        sizes = [self.task.batch_size(b) for b in micro]
        total_rows, total, host = sum(sizes), 0.0, None
        for i, (batch, rows) in enumerate(zip(micro, sizes, strict=True)):
            share = rows / total_rows
            stats, loss = self._micro(batch, rows, share, i == len(micro) - 1, params, host_loss, check_grads)
            total = total + share * stats.total_loss
            host = share * loss if host is None else host + share * loss  # on the loss's device: no copy
            if not stats.finite:
                break
        assert host is not None  # micro holds at least one batch
        return StepResult(dataclasses.replace(stats, total_loss=total), total_rows, host)

    def _micro(self, batch: Any, rows: int, share: float, final: bool, params: Mapping[str, nn.Parameter],
               host_loss: HostLoss, check_grads: bool) -> tuple[AggregationStats, torch.Tensor]:
        prof, task, model, precision = self.profiler, self.task, self.model, self.precision
        with prof.span("step.forward"), precision.autocast():
            loss = host_loss(task.forward(model, batch), batch)
        with prof.span("step.seed_losses"):
            terms = self.kasmina.own_loss_terms(lambda: self._own_loss(batch), rows) if self.morphogenesis else []
        with prof.span("step.backward"):
            scaler = precision.scaler
            unscale = (lambda: scaler.unscale_(self.optimizer())) if scaler is not None else None
            stats = self.aggregator.backward(loss, terms, params, host_batch_size=rows, check_grads=check_grads,
                                             transform=precision.loss_transform(share), final=final,
                                             before_read=unscale)
        return stats, loss.detach()

    def _own_loss(self, batch: Any) -> torch.Tensor:
        with self.precision.autocast():
            return self.task.loss(self.task.forward(self.model, batch), batch)
