"""Training compute: FLOPs per optimizer step of the current structure, and the run's running total.

Counted, not estimated: one forward and backward of a representative batch (the first validation
batch) under `torch.utils.flop_counter.FlopCounterMode`, the seeds' own-loss passes included when
morphogenesis is on, i.e. the work of a training step on that structure. The counter counts what
dominates (matrix products, convolutions, attention); elementwise work is not counted, the usual
convention of compute budgets. The count is per sample and scaled to a step's rows.

When: at the start of each epoch the structure's key (each seed's stage, the parameter and
trainable counts) is compared with the last one counted, and only a change (germinate, fossilize,
cull, a rollback or resume into another structure, a widened layer) is counted again: nothing runs
per step, and a structure is only ever counted once in a row. The count leaves the run as it was:
the model's train/eval modes (it runs in eval mode, which counts the same products without
touching BatchNorm statistics or drawing dropout masks), the RNG streams (forked), and `.grad`
(the backward is `torch.autograd.grad`, which writes no gradient).

The running total lives in the epoch history (`EpochRecord.flops`): an epoch adds its steps
times the per-step count, so it rewinds with a rollback, survives a resume, and is never stored
twice. Steps of a window that was rolled back are not in it. The last batch of an epoch, when
smaller, is counted as a full step (at most one batch per epoch over), and a seed's own loss with
its backward even on the steps the aggregator weighs it 0 (an evaluation window, alpha 0), where
only its forward runs: over by at most one backward per live seed on those steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from esper.contracts import ExecutionLayer
from esper.tolaria.loop.structure import StructureKey, structure_key
from esper.tolaria.observe.runlog import EpochRecord
from esper.tolaria.tasks import Task

log = logging.getLogger(__name__)



def count_step_flops(model: nn.Module, task: Task, batch: Any, *, own_losses: Callable[[Callable[[], torch.Tensor],
                     int], list[Any]] | None = None,
                     autocast: Callable[[], AbstractContextManager[Any]] | None = None) -> int:
    """FLOPs of one training step's forward and backward on `batch` (own-loss passes through
    `own_losses(closure, rows)` when given), leaving modes, RNG and gradients as they were."""
    context = autocast or nullcontext

    def loss_of() -> torch.Tensor:
        with context():
            return task.loss(task.forward(model, batch), batch)

    params = [p for p in model.parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=_cuda_devices(model)), _eval_mode(model), \
            FlopCounterMode(display=False) as counter:
        total = loss_of()
        if own_losses is not None:
            for term in own_losses(loss_of, task.batch_size(batch)):
                total = total + term.loss  # the weight does not change the backward's work
        if params and total.requires_grad:
            torch.autograd.grad(total, params, allow_unused=True)
    return int(counter.get_total_flops())


class TrainingFlops:
    """The run's training FLOPs: `observe()` at each epoch's start, `total(previous, step)` at its end."""

    def __init__(self, *, model: nn.Module, kasmina: ExecutionLayer, task: Task, batches: Iterable[Any],
                 place: Callable[[Any], Any] | None, rows_per_step: int, morphogenesis: bool,
                 autocast: Callable[[], AbstractContextManager[Any]]) -> None:
        self.model, self.kasmina, self.task, self.batches, self.place = model, kasmina, task, batches, place
        self.rows_per_step, self.morphogenesis, self.autocast = rows_per_step, morphogenesis, autocast
        self._batch: Any = None  # the representative batch, drawn once
        self._key: StructureKey | None = None
        self.per_sample = 0.0
        self.counts = 0  # structures counted so far (in this process)
        self.problem = ""  # why the current structure has no count, if it has none

    @property
    def per_step(self) -> float:
        return self.per_sample * self.rows_per_step

    def observe(self) -> None:
        """Count the current structure if it is not the one counted last. Accounting never stops a
        run: with no validation batch, or a model the counter cannot run, the count is 0 and the
        summary says why."""
        key = structure_key(self.kasmina)
        if key == self._key:
            return
        self._key = key
        self.counts += 1
        try:
            batch = self._representative()
        except StopIteration:
            self._unknown("the validation loader yields no batch to count on")
            return
        rows = max(self.task.batch_size(batch), 1)
        own = self.kasmina.own_loss_terms if self.morphogenesis else None
        try:
            flops = count_step_flops(self.model, self.task, batch, own_losses=own, autocast=self.autocast)
        except RuntimeError as exc:  # an operator the counter's dispatch mode cannot run
            self._unknown(f"FlopCounterMode failed on this model: {exc}")
            return
        self.per_sample, self.problem = flops / rows, ""

    def _unknown(self, why: str) -> None:
        if why != self.problem:
            log.warning("training FLOPs are not counted: %s", why)
        self.per_sample, self.problem = 0.0, why

    def total(self, previous: EpochRecord | None, global_step: int) -> float:
        """The running total at `global_step`: the last epoch record's plus this structure's steps since."""
        before, at = (previous.flops, previous.global_step) if previous is not None else (0.0, 0)
        return before + self.per_step * max(global_step - at, 0)

    def summary(self, last: EpochRecord | None) -> dict[str, Any]:
        """`flops` in summary.json: the final structure's per-step and per-sample counts, the total."""
        self.observe()  # the last boundary may have changed the structure
        return {"per_step": self.per_step, "per_sample": self.per_sample, "rows_per_step": self.rows_per_step,
                "total": last.flops if last is not None else 0.0, "structures_counted": self.counts,
                "not_counted": self.problem,
                "counter": "torch.utils.flop_counter (matmul, conv, attention; forward + backward, seed own losses)"}

    def _representative(self) -> Any:
        if self._batch is None:
            with torch.random.fork_rng(devices=_cuda_devices(self.model)):  # a loader's iterator draws a seed
                batch = next(iter(self.batches))
            self._batch = self.place(batch) if self.place is not None else batch
        return self._batch


def rows_per_step(loader: Any, *, accumulate: int, world_size: int, fallback: int) -> int:
    """Samples one optimizer step trains on, over every rank: Tolaria's sampler counts the global
    batch; a plain loader's `batch_size` is one rank's."""
    sampler = getattr(loader, "batch_sampler", None)
    global_batch = getattr(sampler, "batch_size", None)
    if hasattr(sampler, "num_replicas") and isinstance(global_batch, int):
        return global_batch * accumulate
    size = getattr(loader, "batch_size", None)
    if not isinstance(size, int):
        size = getattr(sampler, "batch_size", None)
    return (size if isinstance(size, int) and size > 0 else fallback) * accumulate * world_size


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
