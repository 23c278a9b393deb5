"""What one optimizer step computes: each micro-batch's forward (under the run's autocast), the
seeds' own losses, and the backward through the aggregator, with accumulation and loss scaling.

A step of k micro-batches weighs micro-batch i by its share of the step's samples (b_i / Σ b), so
k micro-batches of a mean loss give the gradient of one batch of Σ b. Only the last micro-batch's
backward reads the gradients (norm, non-finite check, clipping) after the scaler unscales them.
A micro-batch before the last with no weighted seed only accumulates (a bare backward, no sync);
one with weighted seeds goes through the aggregator, and a non-finite one ends the step there. A
non-finite loss anywhere skips the step: every gradient is dropped. With `defer_reads`, an
unchecked step reads nothing: its loss stays on the device in `stats.pending` (see
recovery/loss_readback.py), so the step never waits for the device.

Under torchrun, `reduce` (`World.reduce_gradients`) averages the gradients across ranks right after
the last backward, before the aggregator reads them: the norm, the non-finite check and clipping
see the global gradient. Every rank enters that all-reduce once per step, also when its step ended
early on a non-finite micro-batch (its share is then zeros and its gradients are dropped after).
One process passes no `reduce` and runs exactly what it ran before.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esper.contracts import ExecutionLayer, SeedLossTerm
from esper.tolaria.control.aggregation import AggregationStats, GradientAggregator
from esper.tolaria.loop.precision import Precision
from esper.tolaria.observe.profiling import Profiler
from esper.tolaria.tasks import Task

HostLoss = Callable[[Any, Any], torch.Tensor]
Reduce = Callable[[Sequence[nn.Parameter], int], None]


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
                 optimizer: Callable[[], torch.optim.Optimizer], accumulate: int = 1,
                 defer_reads: bool = False, reduce: Reduce | None = None) -> None:
        self.model, self.task, self.kasmina, self.aggregator = model, task, kasmina, aggregator
        self.precision, self.morphogenesis = precision, morphogenesis
        self.profiler, self.optimizer, self.accumulate = profiler, optimizer, accumulate
        self.defer_reads = defer_reads  # unchecked steps leave their loss on the device (stats.pending)
        self.reduce = reduce  # the cross-rank average, under torchrun only

    def summary(self) -> dict[str, Any]:
        task = self.task
        return {"task": {"name": getattr(task, "name", type(task).__name__), "primary_metric": task.primary_metric,
                         "higher_is_better": task.higher_is_better},
                "precision": self.precision.summary(), "accumulate_steps": self.accumulate}

    def run(self, micro: Sequence[Any], params: Mapping[str, nn.Parameter], host_loss: HostLoss,
            check_grads: bool) -> StepResult:
        defer = self.defer_reads and not check_grads
        if len(micro) == 1:
            rows = self.task.batch_size(micro[0])
            loss, terms = self._forward(micro[0], rows, host_loss)
            stats = self._backward(loss, terms, rows, 1.0, True, params, check_grads, defer, rows)
            return StepResult(stats, rows, loss.detach())
        sizes = [self.task.batch_size(b) for b in micro]
        total_rows, total, host = sum(sizes), 0.0, None
        unread: torch.Tensor | None = None  # the share-weighted loss of micro-batches not read yet
        for i, (batch, rows) in enumerate(zip(micro, sizes, strict=True)):
            share, final = rows / total_rows, i == len(micro) - 1
            loss, terms = self._forward(batch, rows, host_loss)
            part = share * loss.detach()
            host = part if host is None else host + part  # on the loss's device: no copy
            if not final and self._accumulated(loss, terms, share):
                unread = part if unread is None else unread + part
                continue
            stats = self._backward(loss, terms, rows, share, final, params, check_grads, defer, total_rows)
            if stats.pending is not None:
                unread = share * stats.pending if unread is None else unread + share * stats.pending
                continue
            total = total + share * stats.total_loss
            if not stats.finite:
                if not final and self.reduce is not None:
                    self._reduce_dropped(params, total_rows)
                break
        assert host is not None  # micro holds at least one batch
        return StepResult(self._with_unread(stats, total, unread, params), total_rows, host)

    def _with_unread(self, stats: AggregationStats, total: float, unread: torch.Tensor | None,
                     params: Mapping[str, nn.Parameter]) -> AggregationStats:
        """The step's stats with the losses of the micro-batches not read yet: left pending on a
        deferred step, else read now (one sync for all)."""
        if stats.pending is not None:
            return dataclasses.replace(stats, pending=unread)
        if unread is None:
            return dataclasses.replace(stats, total_loss=total)
        earlier = float(unread)
        if stats.finite and not math.isfinite(earlier):  # their gradients are in .grad: the step must not use them
            self.aggregator.discard(params)
            return dataclasses.replace(stats, total_loss=total + earlier, finite=False)
        return dataclasses.replace(stats, total_loss=total + earlier)

    def _forward(self, batch: Any, rows: int, host_loss: HostLoss) -> tuple[torch.Tensor, list[SeedLossTerm]]:
        prof, task, model = self.profiler, self.task, self.model
        with prof.span("step.forward"), self.precision.autocast():
            loss = host_loss(task.forward(model, batch), batch)
        with prof.span("step.seed_losses"):
            terms = self.kasmina.own_loss_terms(lambda: self._own_loss(batch), rows) if self.morphogenesis else []
        return loss, terms

    def _accumulated(self, loss: torch.Tensor, terms: list[SeedLossTerm], share: float) -> bool:
        with self.profiler.span("step.backward"):
            return self.aggregator.accumulate(loss, terms, self.precision.loss_transform(share))

    def _backward(self, loss: torch.Tensor, terms: list[SeedLossTerm], rows: int, share: float, final: bool,
                  params: Mapping[str, nn.Parameter], check_grads: bool, defer: bool,
                  step_rows: int) -> AggregationStats:
        with self.profiler.span("step.backward"):
            scaler = self.precision.scaler
            unscale = (lambda: scaler.unscale_(self.optimizer())) if scaler is not None else None
            if self.reduce is not None and final:
                unscale = self._unscale_then_reduce(unscale, params, step_rows)
            return self.aggregator.backward(loss, terms, params, host_batch_size=rows, check_grads=check_grads,
                                            transform=self.precision.loss_transform(share), final=final,
                                            before_read=unscale, defer=defer)

    def _unscale_then_reduce(self, unscale: Callable[[], None] | None, params: Mapping[str, nn.Parameter],
                             step_rows: int) -> Callable[[], None]:
        reduce = self.reduce
        assert reduce is not None

        def before_read() -> None:
            if unscale is not None:
                unscale()  # each rank's own scale comes off before the ranks' gradients are summed
            reduce(list(params.values()), step_rows)
        return before_read

    def _reduce_dropped(self, params: Mapping[str, nn.Parameter], step_rows: int) -> None:
        """This rank's step ended before its last micro-batch (non-finite): it still joins the step's
        all-reduce, with nothing of its own, so the ranks' collectives stay paired; then it drops
        what came back (the step is skipped on every rank: `agree_step` says not finite)."""
        assert self.reduce is not None
        for p in params.values():
            p.grad = None
        self.reduce(list(params.values()), step_rows)
        for p in params.values():
            p.grad = None

    def _own_loss(self, batch: Any) -> torch.Tensor:
        with self.precision.autocast():
            return self.task.loss(self.task.forward(self.model, batch), batch)
