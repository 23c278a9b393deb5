"""The emergency protocol's handlers, one per level (see `emergency.LEVELS`):

MINOR logs; SEVERE rolls back fast from RAM and skips the offending batch; MAJOR rolls back in
full from the newest valid checkpoint; CRITICAL freezes (and halts when reached by escalation,
since then no rollback worked). Each handler returns an `ActionResult`; a failed one is escalated
by the protocol. A rollback journals a REWIND, is recorded in the run log, and sets
`rolled_back` so the caller can restart the loop at the restored position.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from esper.contracts import EventSink
from esper.leyline import MESSAGE_PRIORITY_HIGH, TELEMETRY_LEVEL_ERROR, TELEMETRY_LEVEL_WARNING, new_id
from esper.tolaria.checkpoint.journal import CommandJournal
from esper.tolaria.config import TolariaConfig
from esper.tolaria.distributed import World
from esper.tolaria.observe.runlog import RollbackEntry, RunLog
from esper.tolaria.recovery.checkpoints import Checkpoints
from esper.tolaria.recovery.emergency import RESTORE_BEFORE_EPOCH, ActionResult, Incident, level_name
from esper.tolaria.recovery.rollback import RollbackCoordinator, RollbackOutcome, Tier
from esper.tolaria.recovery.snapshots import Snapshots
from esper.tolaria.state.position import StopRequest, TrainerState
from esper.tolaria.state.snapshot import Snapshot


class Responses:
    def __init__(self, config: TolariaConfig, *, position: TrainerState, world: World, snapshots: Snapshots,
                 checkpoints: Checkpoints, coordinator: RollbackCoordinator, restore_path: Callable[[], str],
                 journal: CommandJournal, runlog: RunLog, events: EventSink, frozen: threading.Event,
                 lower_lr: Callable[[float, str], None], skip_batch: Callable[[tuple[int, int]], None] | None,
                 stop: StopRequest) -> None:
        self.position, self.world, self.snapshots, self.checkpoints = position, world, snapshots, checkpoints
        self.coordinator, self.journal, self.log, self.events = coordinator, journal, runlog, events
        self.restore_path = restore_path  # how the last rollback restored tensors (participants.RESTORE_PATHS)
        self.frozen, self.lower_lr, self.skip_batch, self.stop = frozen, lower_lr, skip_batch, stop
        self.spike_lr_factor = config.emergency.spike_lr_factor
        self.max_stalled = config.emergency.max_rollbacks_without_progress
        self.offending: list[tuple[int, int]] = []  # (epoch, batch) of the step that raised the incident
        self.rolled_back = False
        self._stalled_rollbacks = 0  # successful rollbacks since a snapshot was last proven healthy

    def progress(self) -> None:
        """Training got through a clean window: the rollback-loop guard starts again."""
        self._stalled_rollbacks = 0

    # ---------------------------------------------------------------- handlers
    def minor(self, incident: Incident) -> ActionResult:
        """Log and adjust: record it."""
        self.events("emergency_minor", TELEMETRY_LEVEL_WARNING, kind=incident.kind, reason=incident.reason)
        return ActionResult(True, "logged", incident.reason)

    def severe(self, incident: Incident) -> ActionResult:
        """Fast rollback to the last healthy snapshot, skip the offending batch, lower the LR, continue."""
        target = self.snapshots.last_healthy()
        if target is None:
            return ActionResult(False, "fast rollback", "no healthy snapshot in the cache")
        if (looping := self._rollback_loop()) is not None:
            return ActionResult(False, "fast rollback", looping)
        outcome = self._rollback(target, "fast", incident)
        if not outcome.succeeded:
            return ActionResult(False, "fast rollback", outcome.reason)
        detail = f"restored {target.snapshot_id}{_late_note(outcome.overruns)}"
        if self.offending and self.skip_batch is not None and incident.kind != "resume_after_freeze":
            for batch in self.offending:
                self.skip_batch(batch)
            listed = ", ".join(str(b) for _, b in self.offending)
            detail += f"; skipping batch {listed} of epoch {self.offending[0][0]}"
        factor = self.spike_lr_factor
        if incident.kind == "loss_spike" and factor < 1.0:
            self.lower_lr(factor, f"spike recovery at step {incident.step}")
            detail += f"; LR x{factor:g}"
        self.rolled_back = True
        return ActionResult(True, "fast rollback", detail)

    def major(self, incident: Incident) -> ActionResult:
        """Full rollback from the newest valid committed checkpoint (one that resumes before the
        incident's `restore_before_epoch` attribute, when it names one and one is kept), then a
        fresh checkpoint."""
        if self.checkpoints.directory is None:
            return ActionResult(False, "full rollback", "checkpoints are disabled: nothing durable to restore")
        if (looping := self._rollback_loop()) is not None:
            return ActionResult(False, "full rollback", looping)
        target = None
        if (before := incident.attributes.get(RESTORE_BEFORE_EPOCH)) is not None:
            target = self.checkpoints.newest(before_epoch=int(before))
        target = target or self.checkpoints.newest()  # none that old kept: the newest is what is left
        if target is None:
            return ActionResult(False, "full rollback", "no valid committed checkpoint")
        outcome = self._rollback(target, "full", incident)
        if not outcome.succeeded:
            return ActionResult(False, "full rollback", outcome.reason)
        self.snapshots.adopt(target)
        self.rolled_back = True
        return ActionResult(True, "full rollback + checkpoint",
                            f"restored {target.snapshot_id} from disk{_late_note(outcome.overruns)}")

    def critical(self, incident: Incident) -> ActionResult:
        """Freeze. The broadcast and acks are the protocol's. A stall (watchdog) resumes from the last
        healthy snapshot when the stalled step returns; a CRITICAL reached by escalation means no
        rollback worked, so the run halts with a final checkpoint of where it stands."""
        self.frozen.set()
        if "escalated_from" in incident.attributes:
            self.stop.request(f"halted: {incident.reason}")
            return ActionResult(True, "freeze + broadcast + halt", incident.reason)
        return ActionResult(True, "freeze + broadcast", f"watchdog: {incident.reason}")

    # ---------------------------------------------------------------- rollbacks
    def _rollback_loop(self) -> str | None:
        """Why another rollback would only repeat itself, or None: more rollbacks than allowed since
        the last clean window (the fault comes back whatever is restored and skipped)."""
        if self._stalled_rollbacks < self.max_stalled:
            return None
        return (f"{self._stalled_rollbacks} rollbacks since the last clean window and the fault recurs; "
                "escalating instead of rolling back again")

    def _rollback(self, target: Snapshot, tier: Tier, incident: Incident) -> RollbackOutcome:
        outcome = self.coordinator.rollback(target, tier)
        if outcome.succeeded:
            self._stalled_rollbacks += 1
            # Commands applied after the target are undone: a later resume must not replay them.
            self.journal.rewind(step=target.global_step, epoch=target.epoch,
                                reason=f"{outcome.tier} rollback to {target.snapshot_id}")
        self.log.add_rollback(RollbackEntry(
            rollback_id=new_id()[:12], tier=outcome.tier, epoch=incident.epoch, step=incident.step,
            target_snapshot_id=target.snapshot_id, target_epoch=target.epoch, target_step=target.global_step,
            reason=f"{level_name(incident.level)} {incident.kind}: {incident.reason}", succeeded=outcome.succeeded,
            phase_ms=dict(outcome.phase_ms), failure=outcome.reason, restore=self.restore_path()))
        self.events(f"rollback_{outcome.tier}", TELEMETRY_LEVEL_ERROR, MESSAGE_PRIORITY_HIGH,
                    target=target.snapshot_id, succeeded=outcome.succeeded, total_ms=outcome.total_ms)
        return outcome


def _late_note(overruns: list[str]) -> str:
    """A rollback's late phases, for the incident's detail (late is recorded, not failed)."""
    return f"; late: {'; '.join(overruns)}" if overruns else ""
