"""`Snapshots`: the RAM snapshots a fast rollback restores, and which of them are proven healthy.

Every snapshot goes into the cache, in host memory (pinned buffers filled on a side stream when
the model is on CUDA); copy-behind copies parameters and optimizer state while the next step runs,
so `settle` must run before anything writes them. A snapshot over the cache's cap, and the stop
checkpoint's, are host copies outside it, made by the same engines. A snapshot becomes a rollback
target only when the window after it trained cleanly (`close_window`); the starting state
counts as healthy. A failed copy loses only that snapshot: it leaves the cache, is never a
rollback target, and is reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from esper.contracts import EventSink
from esper.leyline import MESSAGE_PRIORITY_HIGH, TELEMETRY_LEVEL_ERROR
from esper.tolaria.config import SnapshotConfig
from esper.tolaria.control.aggregation import fp32_norms
from esper.tolaria.observe.profiling import Profiler
from esper.tolaria.observe.timing import MonotonicTimer
from esper.tolaria.recovery.restore_plan import RestorePlan
from esper.tolaria.recovery.snapshot_cache import SnapshotCache, copy_behind_rule
from esper.tolaria.state.position import TrainerState
from esper.tolaria.state.registry import StateRegistry
from esper.tolaria.state.snapshot import Snapshot, SnapshotCopyError

log = logging.getLogger(__name__)


class Snapshots:
    def __init__(self, config: SnapshotConfig, *, registry: StateRegistry, model: nn.Module,
                 optimizer: Callable[[], torch.optim.Optimizer], position: TrainerState, profiler: Profiler,
                 timer: MonotonicTimer, events: EventSink) -> None:
        # An unset max_mb lets the cap follow host memory (two snapshots where RAM holds them).
        max_bytes = int(config.max_mb * 2**20) if "max_mb" in config.model_fields_set else None
        self.cache = SnapshotCache(config.capacity, max_bytes, recycle=config.recycle)
        self.copy_behind = config.copy_behind
        self.registry, self.model, self.optimizer, self.position = registry, model, optimizer, position
        self.profiler, self.timer, self.events = profiler, timer, events
        self._unproven: str | None = None  # the newest snapshot, not yet proven by a clean window
        self.window_clean = True

    def take(self, suffix: str = "") -> Snapshot:
        """Snapshot the live state into the cache (a host copy outside it when it alone exceeds the cap)."""
        p = self.position
        snapshot_id = p.snapshot_id + suffix
        with self.profiler.span("boundary.snapshot"), self.timer.phase("snapshot"):
            # Copied into an evicted snapshot's buffers where shapes match: no fresh allocation;
            # parameters and optimizer state copied behind, while the next step runs.
            defer = copy_behind_rule(self.model) if self.copy_behind else None
            self.settle()
            live = self.registry.live_state()
            cached = self.cache.take(snapshot_id, p.epoch, p.global_step, live, defer=defer)
            snapshot = cached if cached is not None else self.cache.copy_out(snapshot_id, p.epoch, p.global_step,
                                                                             live, defer=defer)
            snapshot.restore_plan = RestorePlan.build(self.model, self.optimizer(), snapshot.state)
        self._unproven, self.window_clean = snapshot.snapshot_id, True
        return snapshot

    def detached(self, suffix: str) -> Snapshot:
        """A host copy outside the cache (the stop checkpoint); the writer waits for its copy."""
        p = self.position
        self.settle()
        return self.cache.copy_out(p.snapshot_id + suffix, p.epoch, p.global_step, self.registry.live_state())

    def settle(self) -> None:
        """Wait for the last snapshot's copy-behind job. Call before anything writes parameters or
        optimizer state (the optimizer step, a rollback, the boundary)."""
        if not self.cache.filling:
            return
        try:
            self.cache.settle()
        except SnapshotCopyError as exc:
            self.window_clean = False  # the lost snapshot must not be marked healthy
            log.error("snapshot lost: %s", exc)
            self.events("snapshot_copy_failed", TELEMETRY_LEVEL_ERROR, MESSAGE_PRIORITY_HIGH, error=str(exc))

    def mark_healthy(self, snapshot: Snapshot) -> None:
        self.cache.mark_healthy(snapshot.snapshot_id)

    def close_window(self) -> bool:
        """The window since the last snapshot trained cleanly: that snapshot becomes a rollback target,
        unless its weights are non-finite (a NaN from an unchecked gradient in a parameter that no
        loss of the window used). True when a snapshot was proven healthy."""
        if self._unproven is None or not self.window_clean:
            return False
        self.settle()
        snapshot = self.cache.peek(self._unproven)
        if snapshot is None or not self.window_clean:
            return False
        try:
            snapshot.wait_ready()  # its host buffers are read below (done long since: a window passed)
        except SnapshotCopyError:
            return False
        if not tensors_finite(snapshot.state["model"].values()):
            self.events("snapshot_nonfinite", TELEMETRY_LEVEL_ERROR, MESSAGE_PRIORITY_HIGH,
                        snapshot=snapshot.snapshot_id)
            return False
        return self.cache.mark_healthy(self._unproven)

    def last_healthy(self) -> Snapshot | None:
        return self.cache.last_healthy()

    def adopt(self, snapshot: Snapshot) -> None:
        """A snapshot restored from disk joins the cache (a later fast rollback may use it)."""
        self.cache.put(snapshot)

    def close(self) -> None:
        try:
            self.cache.close()
        except SnapshotCopyError as exc:
            log.error("the last snapshot was lost: %s", exc)

    def summary(self) -> dict[str, Any]:
        return self.cache.stats()


def weights_finite(model: nn.Module) -> bool:
    """Every parameter is finite (one read pass, on incidents only)."""
    return tensors_finite(p.detach() for p in model.parameters())


def tensors_finite(values: Iterable[Any]) -> bool:
    """Every floating-point tensor among `values` is finite (one read pass). The norms are summed in
    fp32 for fp16/bf16 tensors: in their own dtype large finite weights would read as inf."""
    floats = [t for t in values if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not floats:
        return True
    with torch.no_grad():
        return bool(torch.isfinite(torch.stack(fp32_norms(floats)).sum()))
