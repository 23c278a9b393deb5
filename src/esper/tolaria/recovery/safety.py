"""Safety: snapshots, checkpoints, monitors, rollbacks and the emergency protocol, as one
component the trainer calls at named points (`start`, `step`, `boundary`, `close`).

- Every epoch boundary takes one snapshot (the state at the start of the next epoch): it goes
  into the RAM cache for fast rollback and, every `checkpoint.every_epochs`, to the async
  checkpoint writer. A snapshot becomes a rollback target only when the epoch after it passed
  its monitors (the untrained initial state counts as healthy).
- Step monitors (non-finite loss or gradient, loss spike) are SEVERE: fast rollback to the last
  healthy snapshot, skip the offending batch, optionally lower the LR, continue. Boundary
  monitors: accuracy collapse and cross-rank parameter mismatch are MAJOR (full rollback from
  the newest valid checkpoint); boundary timing degradation is MINOR (logged). The watchdog
  raises CRITICAL from its own thread (freeze, shared-memory broadcast, acks); when the stalled
  step returns, the trainer resumes from the last healthy snapshot.
- A rollback raises `RolledBack` to the trainer's loop, which restarts at the restored position.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from esper.leyline import MESSAGE_PRIORITY_HIGH, TELEMETRY_LEVEL_ERROR, TELEMETRY_LEVEL_WARNING, new_id
from esper.tolaria.checkpoint import (
    CheckpointInfo,
    CheckpointStore,
    CheckpointSuperseded,
    CheckpointWriteError,
    corrupt_latest,
    recover,
)
from esper.tolaria.control.aggregation import fp32_norms
from esper.tolaria.loop.boundary import journal_rewind
from esper.tolaria.recovery.emergency import (
    CRITICAL,
    MAJOR,
    MINOR,
    SEVERE,
    ActionResult,
    EmergencyProtocol,
    Incident,
    level_name,
)
from esper.tolaria.recovery.monitors import AccuracyMonitor, GradientMonitor, LossMonitor, TimingMonitor, Watchdog
from esper.tolaria.recovery.participants import TolariaParticipant, participants
from esper.tolaria.recovery.restore_plan import RestorePlan
from esper.tolaria.recovery.rollback import RollbackCoordinator
from esper.tolaria.recovery.signal import ChannelBusyError, ChannelError, EmergencyChannel, run_channel_key
from esper.tolaria.recovery.snapshot_cache import SnapshotCache, copy_behind_rule
from esper.tolaria.state.capture import live_state, take_snapshot
from esper.tolaria.state.snapshot import Snapshot, SnapshotCopyError

if TYPE_CHECKING:
    from esper.tolaria.control.aggregation import AggregationStats
    from esper.tolaria.loop.trainer import TolariaTrainer

log = logging.getLogger(__name__)


class RolledBack(Exception):
    """Raised to the trainer's loop after a rollback: training restarts at the restored position."""


class Safety:
    def __init__(self, trainer: TolariaTrainer) -> None:
        t, cfg = trainer, trainer.config
        self.t = t
        self.cache = SnapshotCache(cfg.snapshots.capacity, int(cfg.snapshots.max_mb * 2**20),
                                   recycle=cfg.snapshots.recycle)
        self.checkpoint_dir = t.run_dir / "checkpoints" if cfg.checkpoint.enabled and t.run_dir else None
        self.store = self._open_store()  # rank 0 writes; every rank reads for a full rollback or resume
        e = cfg.emergency
        self.loss = LossMonitor(spike_factor=e.spike_factor)
        self.grads = GradientMonitor()
        self.accuracy = AccuracyMonitor(max_drop=e.accuracy_drop)
        self.timing = TimingMonitor(budget_ms=cfg.boundary.total_ms)
        self.watchdog = Watchdog(e.watchdog_s, self._on_hang)
        self.channel = self._open_channel()
        self.protocol = EmergencyProtocol({MINOR: self._minor, MAJOR: self._major, SEVERE: self._severe,
                                           CRITICAL: self._critical}, channel=self.channel,
                                          publish=t.telemetry.publish_emergency, run_id=t.run_id)
        self.coordinator = RollbackCoordinator(participants(t))
        self._tolaria_participant = next(p for p in self.coordinator.participants if isinstance(p, TolariaParticipant))
        self.frozen = threading.Event()
        self._unproven: str | None = None
        self._window_clean = True
        self._pending: list[tuple[int, Future[CheckpointInfo]]] = []
        self.checkpoints_committed: list[dict[str, Any]] = []
        self.recovery_events: list[str] = []
        self._offending: tuple[int, int] | None = None
        self._grad_check_every = cfg.emergency.grad_check_every
        self._telemetry_interval = cfg.telemetry.step_interval  # those steps report the gradient norm
        self._every_steps = cfg.snapshots.every_steps
        self._last_grad_check = -1  # the last global step whose whole gradient was read
        self._careful_until = -1  # check every step up to this global step (a replay after a rollback)
        self._stalled_rollbacks = 0  # successful rollbacks since a snapshot was last proven healthy

    # ---------------------------------------------------------------- setup
    def _open_store(self) -> CheckpointStore | None:
        t, cfg = self.t, self.t.config
        if self.checkpoint_dir is None or not t.world.is_leader:
            return None
        return CheckpointStore(self.checkpoint_dir, keep_last=cfg.checkpoint.keep_last, run_id=t.run_id,
                               config_sha256=cfg.sha256(), fault=self._disk_fault, world_size=t.world.size)

    def _open_channel(self) -> EmergencyChannel | None:
        if not self.t.config.emergency.broadcast:
            return None
        t = self.t
        # Keyed by the run (its directory, else its id), never by the config's name: a sweep of one
        # config on one machine runs many trainers at once.
        key = run_channel_key(t.run_dir, t.run_id, t.world.rank)
        try:
            return EmergencyChannel.create(key)
        except ChannelBusyError as exc:
            where = f"run directory {t.run_dir}" if t.run_dir is not None else f"run {t.run_id}"
            raise ValueError(f"{where} is in use by a live Tolaria process (pid {exc.owner_pid}, emergency "
                             f"channel {key}); wait for it to finish or give this run its own --run-dir") from None

    def start(self) -> None:
        """Before the first step: the starting state is the first (healthy) rollback target, and a
        new run's first checkpoint, so a crash in epoch 0 can be resumed (with its journal) too."""
        snapshot = self._snapshot()
        self.cache.mark_healthy(snapshot.snapshot_id)
        if self.store is not None and not self.t.resumed_from and self.t.state.global_step == 0:
            self._checkpoint(snapshot, epoch=-1)  # -1: before any epoch, so no boundary drill is due
        self.watchdog.start()

    def close(self) -> None:
        self.watchdog.stop()
        try:
            self.cache.close()
        except SnapshotCopyError as exc:
            log.error("the last snapshot was lost: %s", exc)
        if self.store is not None:
            self.store.close(timeout=60)
            self._collect_checkpoints()
        if self.channel is not None:
            self.channel.close()
            self.channel.unlink()

    # ---------------------------------------------------------------- per step
    def grad_check_due(self, step: int) -> bool:
        """Whether this step reads every gradient: every `emergency.grad_check_every` steps, on steps
        whose telemetry reports the norm, and on every step of a replay after a rollback."""
        interval = self._telemetry_interval
        return (step % self._grad_check_every == 0 or step <= self._careful_until
                or bool(interval and step % interval == 0))

    def step_incident(self, stats: AggregationStats) -> Incident | None:
        """Monitors of this rank's step (the loss is already synced by the aggregator)."""
        epoch, step = self.t.state.epoch, self.t.state.global_step
        incident = self.loss.observe(stats.total_loss, epoch, step)
        if stats.grad_checked:
            self._last_grad_check = step
            incident = incident or self.grads.observe(stats.finite, stats.grad_norm, epoch, step)
        return incident

    def respond_to_step(self, local: Incident | None, agreed_level: int, batch_index: int) -> None:
        """Run the agreed response (every rank does the same); raises RolledBack after a rollback."""
        if agreed_level == 0:
            return
        t = self.t
        incident = local if local is not None and local.level == agreed_level else Incident(
            agreed_level, "peer_incident", "another rank saw an incident at this step", t.state.epoch,
            t.state.global_step)
        self._offending = (t.state.epoch, batch_index)
        if incident.kind == "loss_nonfinite" and self._last_grad_check < t.state.global_step - 1 \
                and not weights_finite(t.model):
            # An unchecked earlier gradient broke the weights; this batch is innocent. The replay
            # after the rollback checks every step up to here and skips the batch that did it.
            self._offending = None
            self._careful_until = t.state.global_step
            incident = dataclasses.replace(incident, reason=f"{incident.reason}; the weights are non-finite "
                                           "after unchecked steps: replaying them with gradient checks")
        self._handle(incident)

    def after_step(self) -> None:
        """A step that returned after the watchdog froze training resumes from the last healthy snapshot;
        with `snapshots.every_steps`, every N steps the window closes and a snapshot is taken."""
        t = self.t
        if self.frozen.is_set() and not t.stop_requested:
            self.frozen.clear()
            self._handle(Incident(SEVERE, "resume_after_freeze", "training was frozen by a CRITICAL stall; "
                                  "resuming from the last healthy snapshot", t.state.epoch, t.state.global_step))
        every = self._every_steps
        if every and t.state.global_step % every == 0:
            self._close_window()
            self._snapshot()

    def settle(self) -> None:
        """Wait for the last snapshot's copy-behind job. Call before anything writes parameters or
        optimizer state (the optimizer step, a rollback, the boundary). A failed copy loses only
        that snapshot: it leaves the cache, is never a rollback target, and is reported."""
        if not self.cache.filling:
            return
        try:
            self.cache.settle()
        except SnapshotCopyError as exc:
            self._window_clean = False  # the lost snapshot must not be marked healthy
            log.error("snapshot lost: %s", exc)
            self.t.record_event("snapshot_copy_failed", TELEMETRY_LEVEL_ERROR, MESSAGE_PRIORITY_HIGH, error=str(exc))

    # ---------------------------------------------------------------- per boundary
    def boundary(self, epoch: int, val_accuracy: float, own_ms: float) -> None:
        """After the boundary's own work: monitors, healthy marking, snapshot, checkpoint."""
        t = self.t
        self._collect_checkpoints()
        incidents = [i for i in (self.accuracy.observe(val_accuracy, epoch, t.state.global_step),
                                 self.timing.observe(own_ms, epoch, t.state.global_step)) if i is not None]
        if not t.world.parameters_match(t.model):
            incidents.append(Incident(MAJOR, "rank_divergence", "parameter checksums differ across ranks",
                                      epoch, t.state.global_step))
        for incident in sorted(incidents, key=lambda i: -i.level):
            self._handle(incident)  # a rollback raises out of here
        self._close_window()
        t.state.epoch, t.state.batch_in_epoch = epoch + 1, 0
        snapshot = self._snapshot()
        if self.store is not None and (epoch + 1) % t.config.checkpoint.every_epochs == 0:
            self._checkpoint(snapshot, epoch)

    def _close_window(self) -> None:
        """The window since the last snapshot trained cleanly: that snapshot becomes a rollback target,
        unless its weights are non-finite (a NaN from an unchecked gradient in a parameter that no
        loss of the window used)."""
        if self._unproven is not None and self._window_clean:
            self.settle()
            snapshot = self.cache.peek(self._unproven)
            if snapshot is None or not self._window_clean:
                return
            if not tensors_finite(snapshot.state["model"].values()):
                self.t.record_event("snapshot_nonfinite", TELEMETRY_LEVEL_ERROR, MESSAGE_PRIORITY_HIGH,
                                    snapshot=snapshot.snapshot_id)
                return
            self.cache.mark_healthy(self._unproven)
            self._stalled_rollbacks = 0  # training got through a clean window: progress

    def _snapshot(self) -> Snapshot:
        t = self.t
        snapshot_id = f"e{t.state.epoch:04d}-s{t.state.global_step:08d}"
        with t.profiler.span("boundary.snapshot"), t.timer.phase("snapshot"):
            # Copied into an evicted snapshot's buffers where shapes match: no fresh allocation;
            # parameters and optimizer state copied behind, while the next step runs.
            defer = copy_behind_rule(t.model) if t.config.snapshots.copy_behind else None
            self.settle()
            cached = self.cache.take(snapshot_id, t.state.epoch, t.state.global_step, live_state(t), defer=defer)
            snapshot = cached if cached is not None else take_snapshot(t, snapshot_id)  # over the cap
            snapshot.restore_plan = RestorePlan.build(t.model, t.optim.optimizer, snapshot.state)
        self._unproven, self._window_clean = snapshot.snapshot_id, True
        return snapshot

    def _checkpoint(self, snapshot: Snapshot, epoch: int) -> None:
        assert self.store is not None  # guarded by the caller
        self._pending.append((epoch, self.store.save_async(snapshot)))
        if (d := self.t.faults.due("corrupt-checkpoint", epoch)) is not None:
            self.store.flush(timeout=60)
            self._collect_checkpoints()
            victim = corrupt_latest(self.store.directory)
            result = recover(self.store.directory, clean=False)
            fell_back = result.checkpoint.name if result.checkpoint else "nothing"
            self.recovery_events += result.events
            d.outcome = f"corrupted {victim.parent.name}/{victim.name}; recovery loads {fell_back}"
            self.t.record_event("checkpoint_corruption_detected", TELEMETRY_LEVEL_ERROR, MESSAGE_PRIORITY_HIGH,
                                file=f"{victim.parent.name}/{victim.name}", fell_back_to=fell_back)

    def _collect_checkpoints(self) -> None:
        """Record finished async checkpoint writes on the checkpoint breaker (training thread only)."""
        breaker = self.t.breakers["checkpoint"]
        still = []
        for epoch, future in self._pending:
            if not future.done():
                still.append((epoch, future))
                continue
            error = future.exception()
            if error is None:
                info = future.result()
                breaker.record_success()
                self.checkpoints_committed.append({"name": info.name, "epoch": info.epoch, "step": info.step,
                                                   "size_bytes": info.size_bytes})
            elif isinstance(error, CheckpointWriteError):
                opened = breaker.record_failure(str(error))
                self.t.record_event("checkpoint_write_failed", TELEMETRY_LEVEL_ERROR, MESSAGE_PRIORITY_HIGH,
                                    error=str(error), errno=error.errno, breaker_opened=opened)
            elif not isinstance(error, CheckpointSuperseded):  # e.g. the snapshot's copy failed
                opened = breaker.record_failure(str(error))
                self.t.record_event("checkpoint_failed", TELEMETRY_LEVEL_ERROR, MESSAGE_PRIORITY_HIGH,
                                    error=f"{type(error).__name__}: {error}", breaker_opened=opened)
        self._pending = still

    def _disk_fault(self, where: str) -> None:
        """The store's fault hook: the disk-full drill fails the write of the drill's epoch."""
        drill = next((d for d in self.t.faults.drills if d.kind == "disk-full" and not d.fired
                      and self.t.state.epoch - 1 >= d.epoch), None)
        if drill is not None:
            drill.fired = True
            drill.outcome = f"ENOSPC while writing {where}; previous checkpoints intact, training continued"
            raise OSError(errno.ENOSPC, "No space left on device (drill disk-full)", where)

    # ---------------------------------------------------------------- the protocol and its handlers
    def _handle(self, incident: Incident) -> None:
        self.settle()  # a response may write the live tensors the last snapshot is copying
        self._window_clean = False
        self._rolled_back = False
        first = self.protocol.record_count()
        record = self.protocol.handle(incident)
        for late in (r for r in self.protocol.records_since(first) if r.late):
            # Late but successful: reported, never escalated (a deadline bounds a hang, not a success).
            self.t.record_event("emergency_late", TELEMETRY_LEVEL_WARNING, MESSAGE_PRIORITY_HIGH,
                                emergency_level=level_name(late.level), kind=late.kind, action=late.action,
                                duration_ms=round(late.duration_ms, 3), deadline_ms=late.deadline_ms)
        if self._rolled_back:
            self._rolled_back = False
            raise RolledBack(record.action)

    def emergency_records(self) -> list[dict[str, Any]]:
        """Incidents of this process (the watchdog's included) after those restored by a resume."""
        return [*self.t.emergencies, *self.protocol.summary()]

    _rolled_back = False

    def checkpoint_now(self, reason: str) -> None:
        """A synchronous checkpoint of the current (possibly mid-epoch) state, e.g. on SIGTERM."""
        if self.store is None:
            return
        snapshot = take_snapshot(self.t, f"e{self.t.state.epoch:04d}-s{self.t.state.global_step:08d}-stop")
        self.store.flush(timeout=60)
        self._collect_checkpoints()  # earlier async writes first, so the list stays in order
        try:
            info = self.store.save(snapshot)
        except CheckpointWriteError as exc:
            self.t.record_event("checkpoint_write_failed", TELEMETRY_LEVEL_ERROR, error=str(exc), reason=reason)
            return
        self.checkpoints_committed.append({"name": info.name, "epoch": info.epoch, "step": info.step,
                                           "size_bytes": info.size_bytes, "reason": reason})

    def _minor(self, incident: Incident) -> ActionResult:
        """Log and adjust: record it; a loss-related minor incident lowers the LR."""
        self.t.record_event("emergency_minor", TELEMETRY_LEVEL_WARNING, kind=incident.kind, reason=incident.reason)
        return ActionResult(True, "logged", incident.reason)

    def _severe(self, incident: Incident) -> ActionResult:
        """Fast rollback to the last healthy snapshot, skip the offending batch, lower the LR, continue."""
        target = self.cache.last_healthy()
        if target is None:
            return ActionResult(False, "fast rollback", "no healthy snapshot in the cache")
        if (looping := self._rollback_loop()) is not None:
            return ActionResult(False, "fast rollback", looping)
        outcome = self.coordinator.rollback(target, "fast")
        self._record_rollback(outcome, target, incident)
        if not outcome.succeeded:
            return ActionResult(False, "fast rollback", outcome.reason)
        detail = f"restored {target.snapshot_id}{_late_note(outcome.overruns)}"
        if self._offending is not None and self.t.sampler is not None and incident.kind != "resume_after_freeze":
            self.t.sampler.skipped.add(self._offending)
            detail += f"; skipping batch {self._offending[1]} of epoch {self._offending[0]}"
        factor = self.t.config.emergency.spike_lr_factor
        if incident.kind == "loss_spike" and factor < 1.0:
            self.t.lr.scale(factor, f"spike recovery at step {incident.step}")
            detail += f"; LR x{factor:g}"
        self._rolled_back = True
        self._drill_outcome(incident, detail)
        return ActionResult(True, "fast rollback", detail)

    def _major(self, incident: Incident) -> ActionResult:
        """Full rollback from the newest valid committed checkpoint, then a fresh checkpoint."""
        if self.checkpoint_dir is None:
            return ActionResult(False, "full rollback", "checkpoints are disabled: nothing durable to restore")
        if (looping := self._rollback_loop()) is not None:
            return ActionResult(False, "full rollback", looping)
        if self.store is not None:
            self.store.flush(timeout=60)
            self._collect_checkpoints()
        self.t.world.barrier()  # every rank reads the same committed checkpoint
        # The commands journaled after the target (result.commands) are NOT replayed: the run failed
        # after them, so Tamiyo decides again; the rollback journals a REWIND that retires them.
        result = recover(self.checkpoint_dir, clean=False)
        self.recovery_events += result.events
        if result.checkpoint is None:
            return ActionResult(False, "full rollback", "no valid committed checkpoint")
        target = result.checkpoint.snapshot()
        outcome = self.coordinator.rollback(target, "full")
        self._record_rollback(outcome, target, incident)
        if not outcome.succeeded:
            return ActionResult(False, "full rollback", outcome.reason)
        self.cache.put(target)
        self._rolled_back = True
        detail = f"restored {target.snapshot_id} from disk{_late_note(outcome.overruns)}"
        self._drill_outcome(incident, detail)
        return ActionResult(True, "full rollback + checkpoint", detail)

    def _critical(self, incident: Incident) -> ActionResult:
        """Freeze. The broadcast and acks are the protocol's. A stall (watchdog) resumes from the last
        healthy snapshot when the stalled step returns; a CRITICAL reached by escalation means no
        rollback worked, so the run halts with a final checkpoint of where it stands."""
        self.frozen.set()
        if "escalated_from" in incident.attributes:
            self.t.request_stop(f"halted: {incident.reason}")
            self._drill_outcome(incident, "no rollback succeeded; the run halted")
            return ActionResult(True, "freeze + broadcast + halt", incident.reason)
        self._drill_outcome(incident, "frozen and broadcast; resumed from the last healthy snapshot")
        return ActionResult(True, "freeze + broadcast", f"watchdog: {incident.reason}")

    def _on_hang(self, incident: Incident) -> None:
        try:
            self.protocol.handle(incident)
        except ChannelError as exc:
            log.error("CRITICAL broadcast failed: %s", exc)

    def _rollback_loop(self) -> str | None:
        """Why another rollback would only repeat itself, or None: more rollbacks than allowed since
        the last clean window (the fault comes back whatever is restored and skipped)."""
        limit = self.t.config.emergency.max_rollbacks_without_progress
        if self._stalled_rollbacks < limit:
            return None
        return (f"{self._stalled_rollbacks} rollbacks since the last clean window and the fault recurs; "
                "escalating instead of rolling back again")

    def _record_rollback(self, outcome: Any, target: Snapshot, incident: Incident) -> None:
        t = self.t
        if outcome.succeeded:
            self._stalled_rollbacks += 1
            # Commands applied after the target are undone: a later resume must not replay them.
            journal_rewind(t, target.global_step, target.epoch, f"{outcome.tier} rollback to {target.snapshot_id}")
        entry = {"rollback_id": new_id()[:12], "tier": outcome.tier, "epoch": incident.epoch, "step": incident.step,
                 "target_snapshot_id": target.snapshot_id, "target_epoch": target.epoch,
                 "target_step": target.global_step, "reason": f"{level_name(incident.level)} {incident.kind}: "
                 f"{incident.reason}", "succeeded": outcome.succeeded, "phase_ms": dict(outcome.phase_ms),
                 "failure": outcome.reason, "restore": self._tolaria_participant.last_restore}
        t.rollbacks.append(entry)
        t.record_event(f"rollback_{outcome.tier}", TELEMETRY_LEVEL_ERROR, MESSAGE_PRIORITY_HIGH,
                       target=target.snapshot_id, succeeded=outcome.succeeded, total_ms=outcome.total_ms)

    def _drill_outcome(self, incident: Incident, detail: str) -> None:
        drill = self.t.active_drill
        if drill is not None:
            self.t.faults.record(drill, f"{level_name(incident.level)} {incident.kind}: {detail}")

    # ---------------------------------------------------------------- state and summary
    def monitors_state(self) -> dict[str, Any]:
        return {"loss": self.loss.state_dict(), "grads": self.grads.state_dict(),
                "accuracy": self.accuracy.state_dict(), "timing": self.timing.state_dict()}

    def load_monitors_state(self, state: dict[str, Any]) -> None:
        self.loss.load_state_dict(state["loss"])
        self.grads.load_state_dict(state["grads"])
        self.accuracy.load_state_dict(state["accuracy"])
        self.timing.load_state_dict(state["timing"])

    def adopt_run_id(self, run_id: str) -> None:
        """A resumed run's id: the store's manifests and the protocol's signals carry it from now on."""
        if self.store is not None:
            self.store.run_id = run_id
        self.protocol.run_id = run_id

    def resume_from(self, directory: Path, *, name: str | None = None) -> Snapshot:
        # Only this run's own directory is cleaned: a branch reads another run without changing it.
        own = self.checkpoint_dir is not None and Path(directory).resolve() == self.checkpoint_dir.resolve()
        clean = self.t.world.is_leader and own
        result = recover(directory, clean=clean, name=name) if name else recover(directory, clean=clean)
        self.recovery_events += result.events
        if result.checkpoint is None:
            raise FileNotFoundError(f"no valid committed checkpoint in {directory}: "
                                    f"{'; '.join(result.events) or 'the directory holds none'}")
        written_by = result.checkpoint.manifest.world_size
        if written_by and written_by != self.t.world.size:
            raise ValueError(f"{result.checkpoint.name} was written by a job of {written_by} process(es); resume it "
                             f"with the same world size (torchrun --nproc-per-node {written_by}), not "
                             f"{self.t.world.size}, so the data order and results stay exact")
        chosen = result.checkpoint
        if name is None:  # continuing the run: the boundaries it passed after the checkpoint replay
            self.t.boundary.replay_journal(result.commands)
        elif own:  # a branch in this run's own WAL: what followed the checkpoint is abandoned
            journal_rewind(self.t, chosen.step, chosen.epoch, f"branch from {chosen.name}")
        return chosen.snapshot()

    def summary(self) -> dict[str, Any]:
        return {
            "snapshot_cache": self.cache.stats(),
            "checkpoints": self.checkpoints_committed,
            "checkpoint_dir": str(self.checkpoint_dir or ""),
            "recovery_events": self.recovery_events,
            "watchdog_fired": self.watchdog.fired_total,
        }


def _late_note(overruns: list[str]) -> str:
    """A rollback's late phases, for the incident's detail (late is recorded, not failed)."""
    return f"; late: {'; '.join(overruns)}" if overruns else ""


def weights_finite(model: torch.nn.Module) -> bool:
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


def scramble_weights(model: torch.nn.Module) -> None:
    """The accuracy-collapse drill: wreck the host's weights so validation accuracy really collapses."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1234)
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 5.0)
