"""`RunLog`: what happened in a run, typed, written through methods, read by the summary and report.

Two kinds of record, told apart on rollback: the *history* (one record per epoch, seed stage
changes) belongs to the training state and rewinds with it; the *incident records* (rollbacks,
Tamiyo fallbacks, failed applies, emergencies) describe the run itself and survive a rollback.
A resume restores both. The state dict holds plain values, so checkpoints stay readable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class EpochRecord:
    epoch: int
    global_step: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    lr: dict[str, float]
    param_count: int
    conservative_mode: bool
    epoch_seconds: float
    boundary_ms: float
    command: str
    val_metrics: dict[str, float] = field(default_factory=dict)  # every metric of the task, by name
    attribution: dict[str, dict[str, float]] = field(default_factory=dict)  # seed id -> loss/score attribution
    flops: float = 0.0  # training FLOPs of the run up to this epoch's end (loop/flops.py)


@dataclass
class StageChange:
    epoch: int
    stage: str


@dataclass
class Fallback:
    epoch: int
    kind: str
    reason: str


@dataclass
class ApplyFailure:
    epoch: int
    command_id: str
    error: str
    model_unchanged: bool


@dataclass
class RollbackEntry:
    rollback_id: str
    tier: str
    epoch: int
    step: int
    target_snapshot_id: str
    target_epoch: int
    target_step: int
    reason: str
    succeeded: bool
    phase_ms: dict[str, float]
    failure: str
    restore: str


def _records(cls: Any, rows: Iterable[Mapping[str, Any]]) -> list[Any]:
    return [cls(**dict(row)) for row in rows]


def _rows(records: Iterable[Any]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]


@dataclass
class RunLog:
    epochs: list[EpochRecord] = field(default_factory=list)
    seed_history: dict[str, list[StageChange]] = field(default_factory=dict)
    seed_stage: dict[str, str] = field(default_factory=dict)  # each seed's last recorded stage
    fallbacks: list[Fallback] = field(default_factory=list)
    apply_failures: list[ApplyFailure] = field(default_factory=list)
    rollbacks: list[RollbackEntry] = field(default_factory=list)
    restored_emergencies: list[dict[str, Any]] = field(default_factory=list)  # from before a resume
    recovery_events: list[str] = field(default_factory=list)  # what checkpoint recovery passed over (not saved)
    # This process's emergency records, owned by the emergency protocol (its watchdog thread appends).
    live_emergencies: Callable[[], list[dict[str, Any]]] = field(default=lambda: [], repr=False)

    # ---------------------------------------------------------------- writing
    def add_epoch(self, record: EpochRecord) -> None:
        self.epochs.append(record)

    def add_stage_changes(self, epoch: int, stages: Mapping[str, str]) -> None:
        """Record the seeds whose stage differs from the last one recorded (`stages`: seed_id -> stage)."""
        for seed_id, stage in stages.items():
            if self.seed_stage.get(seed_id) != stage:
                self.seed_stage[seed_id] = stage
                self.seed_history.setdefault(seed_id, []).append(StageChange(epoch, stage))

    def add_fallback(self, record: Fallback) -> None:
        self.fallbacks.append(record)

    def add_apply_failure(self, record: ApplyFailure) -> None:
        self.apply_failures.append(record)

    def add_rollback(self, record: RollbackEntry) -> None:
        self.rollbacks.append(record)

    # ---------------------------------------------------------------- reading
    @property
    def last_epoch(self) -> EpochRecord | None:
        return self.epochs[-1] if self.epochs else None

    def emergencies(self) -> list[dict[str, Any]]:
        """Every incident of the run: those restored by a resume, then this process's."""
        return [*self.restored_emergencies, *self.live_emergencies()]

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": _rows(self.epochs),
            "seed_history": {k: _rows(v) for k, v in self.seed_history.items()},
            "seed_stage": dict(self.seed_stage),
            "rollbacks": _rows(self.rollbacks), "fallbacks": _rows(self.fallbacks),
            "apply_failures": _rows(self.apply_failures), "emergencies": self.emergencies(),
        }

    def rewind_to(self, state: Mapping[str, Any]) -> None:
        """A rollback: the history goes back with the training state; the incident records stay."""
        self.epochs = _records(EpochRecord, state["history"])
        self.seed_history = {k: _records(StageChange, v) for k, v in state["seed_history"].items()}
        self.seed_stage = dict(state["seed_stage"])

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """A resume: everything as saved (this process has no incidents of its own yet)."""
        self.rewind_to(state)
        self.rollbacks = _records(RollbackEntry, state.get("rollbacks", []))
        self.fallbacks = _records(Fallback, state.get("fallbacks", []))
        self.apply_failures = _records(ApplyFailure, state.get("apply_failures", []))
        self.restored_emergencies = [dict(x) for x in state.get("emergencies", [])]
