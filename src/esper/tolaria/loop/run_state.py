"""Which components a snapshot holds, under which key, in which (restore) order; and a resume.

Structure first (Kasmina, so a grown model has its seed modules), then weights, then the
optimizer (rebuilt for that structure, state loaded by parameter name), then the LR controller
(which re-writes every group's LR), then the rest. A new stateful component registers here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from esper.contracts import EventSink, ExecutionLayer, StatefulComponent
from esper.leyline import TELEMETRY_LEVEL_WARNING
from esper.tolaria.control.lr import UnifiedLRController
from esper.tolaria.control.optimizer import DynamicOptimizerManager
from esper.tolaria.loop.batches import EpochBatches
from esper.tolaria.observe.runlog import RunLog
from esper.tolaria.recovery.checkpoints import Checkpoints
from esper.tolaria.recovery.monitors import MonitorSet
from esper.tolaria.state.position import RunIdentity, TrainerState
from esper.tolaria.state.registry import StateRegistry


def register_state(*, kasmina: ExecutionLayer, optim: DynamicOptimizerManager, lr: UnifiedLRController,
                   monitors: MonitorSet, others: Mapping[str, StatefulComponent | None], batches: EpochBatches,
                   trainer: TrainerSection) -> StateRegistry:
    registry = StateRegistry()
    registry.register("kasmina", kasmina)
    registry.register("model", kasmina.model)
    registry.register("optimizer", optim)
    registry.register("lr", _LRSection(lr))
    for key, component in others.items():
        registry.register(key, component)
    registry.register("monitors", monitors)
    batches.register(registry)  # rng, iterator_rng, data
    registry.register("trainer", trainer)
    return registry


class _LRSection:
    """The LR controller's section: loading it re-writes every group's LR at once."""

    def __init__(self, lr: UnifiedLRController) -> None:
        self.lr = lr

    def state_dict(self) -> dict[str, Any]:
        return self.lr.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.lr.load_state_dict(state)
        self.lr.refresh()


class TrainerSection:
    """The snapshot's "trainer" section: the position, the run log, and the run's identity."""

    def __init__(self, position: TrainerState, log: RunLog, identity: RunIdentity) -> None:
        self.position, self.log, self.identity = position, log, identity

    def state_dict(self) -> dict[str, Any]:
        p = self.position
        return {"epoch": p.epoch, "batch_in_epoch": p.batch_in_epoch, "global_step": p.global_step,
                **self.log.state_dict(), "config_sha256": self.identity.config_sha256,
                "run_id": self.identity.run_id}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self._position(saved)
        self.log.load_state_dict(saved)

    def rewind_to(self, saved: Mapping[str, Any]) -> None:
        self._position(saved)
        self.log.rewind_to(saved)

    def _position(self, saved: Mapping[str, Any]) -> None:
        p = self.position
        p.epoch, p.batch_in_epoch, p.global_step = saved["epoch"], saved["batch_in_epoch"], saved["global_step"]


def resume_run(directory: Path, name: str | None, *, checkpoints: Checkpoints, registry: StateRegistry,
               identity: RunIdentity, adopt_run_id: Callable[[str], None], events: EventSink) -> str:
    """Restore the newest valid committed checkpoint in `directory` (or exactly `name`); returns its id."""
    snapshot = checkpoints.resume_from(directory, name=name)
    saved = snapshot.state["trainer"]
    if saved.get("config_sha256") != identity.config_sha256:
        events("resume_config_changed", TELEMETRY_LEVEL_WARNING, checkpoint=snapshot.snapshot_id)
    registry.restore(snapshot.state, rewind=False)
    # A run resumed from its own checkpoints keeps its id (a remote Tamiyo keeps its controller;
    # manifests and signals name one run); a branch into another run directory is a new run.
    if saved.get("run_id") and (checkpoints.directory is None or checkpoints.owns(directory)):
        identity.run_id = saved["run_id"]
        adopt_run_id(saved["run_id"])
    return snapshot.snapshot_id
