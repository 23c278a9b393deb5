"""`LoggerCallback`: feeds one `Logger` from the trainer's named points.

Everything comes from the run log (`trainer.log`) at each epoch's end: the epoch record, the
seeds' stage changes of that epoch (with the reason of the command that made them), and the
rollbacks and emergencies recorded since the last call. Incident records survive rollbacks and
resumes, so they are counted from where the run stood at `FIT_BEGIN`: a resumed run does not
log its earlier incidents again.

A logger that fails mid-run (a tracking server gone, a full disk) must not stop training: each
failure is logged, and after `MAX_FAILURES` in a row the logger is switched off for the rest of
the run. A failure in `start` is raised: it is a configuration problem, found before any step.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from esper.tolaria.observe.loggers.protocol import Logger, RunEvent, RunStart, Status
from esper.tolaria.observe.runlog import EpochRecord, RollbackEntry, RunLog

log = logging.getLogger(__name__)

MAX_FAILURES = 3


def epoch_metrics(record: EpochRecord, run_log: RunLog) -> dict[str, float]:
    """The epoch's numbers under the names every logger uses (`val/<metric>` for each task metric,
    `lr/<group>` for the host and each seed's group)."""
    metrics = {"train/loss": record.train_loss, "val/loss": record.val_loss, "val/accuracy": record.val_accuracy,
               **{f"val/{name}": value for name, value in record.val_metrics.items()},
               **{f"lr/{group}": lr for group, lr in record.lr.items()},
               "model/params": record.param_count, "state/conservative_mode": record.conservative_mode,
               "time/epoch_seconds": record.epoch_seconds, "time/boundary_ms": record.boundary_ms,
               "incidents/rollbacks": len(run_log.rollbacks), "incidents/emergencies": len(run_log.emergencies())}
    return {name: float(value) for name, value in metrics.items()}


def seed_events(run_log: RunLog, epoch: int, step: int, report: Any) -> list[RunEvent]:
    """The stage changes recorded for `epoch`. The boundary's command gave the reason for the seed it
    targets, and for a germination (it targets the free slot, not the new seed)."""
    command = getattr(report, "command", None)
    reason = command.annotations.get("reason", "") if command is not None else ""
    target = command.target_seed_id if command is not None else ""
    events = []
    for seed_id, changes in run_log.seed_history.items():
        for change in changes:
            if change.epoch == epoch:
                why = reason if seed_id == target or change.stage == "GERMINATED" else ""
                events.append(RunEvent("seed", f"seed.{seed_id}.{change.stage}", epoch, step, change.stage, seed_id,
                                       why or "no command of this boundary named the seed"))
    return events


def rollback_event(index: int, entry: RollbackEntry) -> RunEvent:
    outcome = (f"restored epoch {entry.target_epoch} step {entry.target_step}" if entry.succeeded
               else f"failed: {entry.failure}")
    return RunEvent("rollback", f"rollback.{index}", entry.epoch, entry.step, entry.tier, "",
                    f"{entry.reason}; {outcome}")


def emergency_event(index: int, record: dict[str, Any]) -> RunEvent:
    return RunEvent("emergency", f"emergency.{index}", int(record.get("epoch", -1)), int(record.get("step", -1)),
                    str(record.get("level", "")).upper(), "",
                    f"{record.get('kind', '')}: {record.get('reason', '')}; action {record.get('action', '')}")


class LoggerCallback:
    """A trainer callback for one logger (epoch metrics, events, config, close)."""

    def __init__(self, logger: Logger) -> None:
        self.logger = logger
        self._rollbacks = self._emergencies = 0  # incident records already logged
        self._failures = 0
        self.enabled = True

    def on_fit_begin(self, trainer: Any) -> None:
        self._rollbacks, self._emergencies = len(trainer.log.rollbacks), len(trainer.log.emergencies())
        self.logger.start(RunStart(trainer.run_id, trainer.config.run.name, trainer.config.model_dump(mode="json"),
                                   resumed=bool(trainer.resumed_from), step=trainer.state.global_step))

    def on_boundary_end(self, trainer: Any, epoch: int, report: Any) -> None:
        record = trainer.log.epochs[-1]
        events = [*seed_events(trainer.log, epoch, record.global_step, report), *self._incidents(trainer.log)]
        if events:
            self._call(self.logger.log_events, events)
        self._call(self.logger.log_epoch, epoch, record.global_step, epoch_metrics(record, trainer.log))

    def on_fit_end(self, trainer: Any) -> None:
        events = self._incidents(trainer.log)  # a halt or a stop after the last boundary
        if events:
            self._call(self.logger.log_events, events)
        status: Status = ("failed" if sys.exc_info()[1] is not None  # FIT_END inside the loop's `except`
                          else "stopped" if trainer.stop.requested else "finished")
        self._call(self.logger.close, status)

    def _incidents(self, run_log: RunLog) -> list[RunEvent]:
        rollbacks, emergencies = run_log.rollbacks, run_log.emergencies()
        events = [emergency_event(i, emergencies[i]) for i in range(self._emergencies, len(emergencies))]
        events += [rollback_event(i, rollbacks[i]) for i in range(self._rollbacks, len(rollbacks))]
        self._rollbacks, self._emergencies = len(rollbacks), len(emergencies)
        return events

    def _call(self, method: Callable[..., None], *args: Any) -> None:
        if not self.enabled:
            return
        try:
            method(*args)
        except Exception:  # noqa: BLE001 - a logger is an observer: recorded here, decided below
            self._failures += 1
            log.warning("%s logger: %s failed (%d in a row)", self.logger.name, method.__name__, self._failures,
                        exc_info=True)
            if self._failures >= MAX_FAILURES:
                self.enabled = False
                log.warning("%s logger switched off for the rest of the run after %d failures in a row",
                            self.logger.name, self._failures)
            return
        self._failures = 0


class StepLoggerCallback(LoggerCallback):
    """`LoggerCallback` that also logs every `every`-th step's loss and LRs. A separate class, so a run
    that logs no steps keeps no step hook (each call on the step path costs time)."""

    def __init__(self, logger: Logger, every: int) -> None:
        super().__init__(logger)
        self.every = every

    def on_step_end(self, trainer: Any, step: int, loss: Any) -> None:
        if step % self.every or loss is None:
            return
        metrics = {"train/step_loss": float(loss), **{f"lr/{g}": lr for g, lr in trainer.lr.current().items()}}
        self._call(self.logger.log_step, step, metrics)
