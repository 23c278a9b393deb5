"""Safety: monitors, rollbacks and the emergency protocol, called by the loop at named points
(`start`, `step_incident`/`respond_to_step`, `after_step`, `boundary`, `close`).

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
- A rollback raises `RolledBack` to the loop, which restarts at the restored position.
- Deferred steps (`run.loss_readback`; see loss_readback.py): an unchecked step's loss is read one
  step later and its monitors run then. Every queued loss is read before a window closes, before
  the boundary and before a checkpoint of the live state, so nothing unread is ever proven healthy
  or saved. A late incident rolls back like any step incident; a late non-finite loss cannot tell
  its batch from an earlier unchecked update (the weights are already stepped), so the replay
  checks every step up to it and finds the offender as a synchronous run would.
- Under torchrun every decision is voted before any rank acts (recovery/agreement.py): the step's
  incident, freeze and stop in the step's vote (`agree_step`), the boundary's incidents, the state
  digest and stop in one vote at the boundary, and every response's outcome, so all ranks roll
  back, escalate, resume and stop together. One process votes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from esper.contracts import EventSink
from esper.leyline import MESSAGE_PRIORITY_HIGH, TELEMETRY_LEVEL_WARNING
from esper.tolaria.config import TolariaConfig
from esper.tolaria.control.aggregation import AggregationStats
from esper.tolaria.distributed import World
from esper.tolaria.observe.runlog import RunLog
from esper.tolaria.recovery import agreement
from esper.tolaria.recovery.checkpoints import Checkpoints
from esper.tolaria.recovery.emergency import CRITICAL, MAJOR, MINOR, SEVERE, EmergencyProtocol, Incident, level_name
from esper.tolaria.recovery.loss_readback import LossReadback, PendingLoss
from esper.tolaria.recovery.monitors import MonitorSet, Watchdog
from esper.tolaria.recovery.responses import Responses
from esper.tolaria.recovery.signal import ChannelError, EmergencyChannel
from esper.tolaria.recovery.snapshots import Snapshots, weights_finite
from esper.tolaria.state.position import StopRequest, TrainerState

log = logging.getLogger(__name__)


class RolledBack(Exception):
    """Raised to the loop after a rollback: training restarts at the restored position."""


class Safety:
    def __init__(self, config: TolariaConfig, *, position: TrainerState, world: World, model: nn.Module,
                 monitors: MonitorSet, snapshots: Snapshots, checkpoints: Checkpoints, responses: Responses,
                 runlog: RunLog, events: EventSink, channel: EmergencyChannel | None,
                 publish_emergency: Callable[[Any], None], run_id: str, stop: StopRequest) -> None:
        self.config, self.position, self.world, self.model = config, position, world, model
        self.monitors, self.snapshots, self.checkpoints = monitors, snapshots, checkpoints
        self.responses, self.frozen = responses, responses.frozen
        self.coordinator = responses.coordinator  # the rollback's participants (bench and tests drive it directly)
        self.log, self.events, self.channel, self.stop = runlog, events, channel, stop
        e = config.emergency
        self.watchdog = Watchdog(e.watchdog_s, self._on_hang)
        r = responses
        self.protocol = EmergencyProtocol({MINOR: r.minor, MAJOR: r.major, SEVERE: r.severe, CRITICAL: r.critical},
                                          channel=channel, publish=publish_emergency, run_id=run_id)
        runlog.live_emergencies = self.protocol.summary
        self._grad_check_every = e.grad_check_every
        self._telemetry_interval = config.telemetry.step_interval  # those steps report the gradient norm
        self._every_steps = config.snapshots.every_steps
        self._last_grad_check = -1  # the last global step whose whole gradient was read
        self._careful_until = -1  # check every step up to this global step (a replay after a rollback)
        self.late = LossReadback(next(model.parameters(), torch.empty(0)).device)  # deferred steps' losses
        # Where signals land: the stop itself in one process; under torchrun a request the next vote serves.
        self.signals: StopRequest = stop if not world.distributed else agreement.PendingStop(
            rank=world.rank, since_sync=world.sync.since, hung_after_s=world.timeout_s / 2,
            with_peers=world.sync.with_peers)
        self._verdict = agreement.StepVerdict(True, 0, False, None, False)  # the last step's vote

    # ---------------------------------------------------------------- the run's ends
    def start(self, *, resumed: bool) -> None:
        """Before the first step: the starting state is the first (healthy) rollback target, and a
        new run's first checkpoint, so a crash in epoch 0 can be resumed (with its journal) too. That
        checkpoint is written before training starts: a command journaled at the first boundary is
        tied to it, and a crash before an async write finished would leave the journal nothing to
        replay onto."""
        snapshot = self.snapshots.take()
        self.snapshots.mark_healthy(snapshot)
        if not resumed and self.position.global_step == 0:
            self.checkpoints.save_now(snapshot, "the starting state")
        self.watchdog.start()

    def close(self) -> None:
        self.watchdog.stop()
        self.snapshots.close()
        self.checkpoints.close()
        if self.channel is not None:
            self.channel.close()
            self.channel.unlink()

    def flush(self) -> None:
        """The last snapshot copied and every async checkpoint written (their outcomes recorded)."""
        self.snapshots.settle()
        self.checkpoints.flush()

    def checkpoint_now(self, reason: str) -> None:
        """A synchronous checkpoint of the current (possibly mid-epoch) state, e.g. on SIGTERM. Deferred
        steps are checked first: a bad one is rolled back and the restored state is what is saved."""
        try:
            self._check_late(self.late.drain())
        except RolledBack:
            pass
        if self.checkpoints.writes:
            self.checkpoints.save_now(self.snapshots.detached("-stop"), reason)

    # ---------------------------------------------------------------- per step
    def settle(self) -> None:
        self.snapshots.settle()

    def before_boundary(self) -> None:
        """Every deferred step checked (a late incident raises RolledBack), the last snapshot copied."""
        self._check_late(self.late.drain())
        self.snapshots.settle()

    def grad_check_due(self, step: int) -> bool:
        """Whether this step reads every gradient: every `emergency.grad_check_every` steps, on steps
        whose telemetry reports the norm, and on every step of a replay after a rollback."""
        interval = self._telemetry_interval
        return (step % self._grad_check_every == 0 or step <= self._careful_until
                or bool(interval and step % interval == 0))

    def step_incident(self, stats: AggregationStats, batches: Sequence[int] = (), *,
                      overflow_ok: bool = False) -> Incident | None:
        """Monitors of this rank's step. `overflow_ok`: a loss scaler is on, so non-finite gradients
        under a finite loss are its overflow, not an incident. A deferred step (`stats.pending`) is
        queued and None returned; the deferred steps before it are checked now (a late incident
        rolls back and raises RolledBack)."""
        epoch, step = self.position.epoch, self.position.global_step
        if stats.pending is not None:
            self.late.submit(stats.pending, epoch=epoch, step=step, batches=tuple(batches))
            self._check_late(self.late.arrived())
            return None
        if self.late:
            self._check_late(self.late.drain())  # in step order: the steps before this one first
        incident = self.monitors.loss.observe(stats.total_loss, epoch, step)
        if stats.grad_checked and not (overflow_ok and stats.grad_overflow):
            self._last_grad_check = step
            incident = incident or self.monitors.grads.observe(stats.finite, stats.grad_norm, epoch, step)
        return incident

    def agree_step(self, finite: bool, local: Incident | None) -> tuple[bool, int]:
        """Under torchrun: this step's verdict from every rank's vote (finite, worst level); a stop or a
        freeze voted by any rank is taken by all (see agreement.py)."""
        verdict = agreement.agree_step(self.world, finite=finite, incident=local, stop=self.signals.reason,
                                       frozen=self.frozen.is_set())
        if verdict.stop is not None and not self.stop.requested:
            self.stop.request(verdict.stop)
        self._verdict = verdict
        return verdict.finite, verdict.level

    def respond_to_step(self, local: Incident | None, agreed_level: int, batches: Sequence[int]) -> None:
        """Run the agreed response (every rank does the same); raises RolledBack after a rollback."""
        if agreed_level == 0:
            return
        p = self.position
        incident = local if local is not None and local.level == agreed_level else \
            agreement.peer_incident(agreed_level, p.epoch, p.global_step)
        self.responses.offending = [(p.epoch, b) for b in batches]  # every micro-batch of the step
        nonfinite_loss = self._verdict.loss_nonfinite if self.world.distributed else incident.kind == "loss_nonfinite"
        if nonfinite_loss and self._last_grad_check < p.global_step - 1 and not weights_finite(self.model):
            # An unchecked earlier gradient broke the weights; this batch is innocent.
            incident = self._replay_with_checks(incident, p.global_step, "; the weights are non-finite after "
                                                "unchecked steps: replaying them with gradient checks")
        self._handle(incident)

    def _replay_with_checks(self, incident: Incident, until: int, why: str) -> Incident:
        """The incident's batch cannot be blamed: skip nothing, and let the replay after the rollback
        check every step up to `until`, which finds and skips the batch that did it."""
        self.responses.offending = []
        self._careful_until = until
        return dataclasses.replace(incident, reason=f"{incident.reason}{why}")

    def _check_late(self, arrived: list[tuple[PendingLoss, float]]) -> None:
        """The loss monitor over deferred steps, in step order; the first incident is handled."""
        for pending, loss in arrived:
            incident = self.monitors.loss.observe(loss, pending.epoch, pending.step)
            if incident is None:
                continue
            self.model.zero_grad(set_to_none=True)  # the current step's gradients die with the rollback
            self.responses.offending = [(pending.epoch, b) for b in pending.batches]
            if incident.kind == "loss_nonfinite":  # its update is applied: the weights cannot tell who broke them
                incident = self._replay_with_checks(incident, pending.step, " (read one step late): replaying "
                                                    "the steps up to it with checks")
            self._handle(incident)

    def after_step(self) -> None:
        """A step that returned after the watchdog froze training resumes from the last healthy snapshot;
        with `snapshots.every_steps`, every N steps the window closes and a snapshot is taken."""
        p = self.position
        frozen = self._verdict.frozen if self.world.distributed else self.frozen.is_set()  # voted, not seen
        if frozen and not self.stop.requested:
            self.frozen.clear()
            self._verdict = dataclasses.replace(self._verdict, frozen=False)
            self._handle(Incident(SEVERE, "resume_after_freeze", "training was frozen by a CRITICAL stall; "
                                  "resuming from the last healthy snapshot", p.epoch, p.global_step))
        every = self._every_steps
        if every and p.global_step % every == 0:
            self._close_window()
            self.snapshots.take()

    # ---------------------------------------------------------------- per boundary
    def boundary(self, epoch: int, val_accuracy: float, own_ms: float) -> None:
        """After the boundary's own work: monitors, healthy marking, snapshot, checkpoint."""
        p = self.position
        self.checkpoints.collect()
        incidents = [i for i in (self.monitors.accuracy.observe(val_accuracy, epoch, p.global_step),
                                 self.monitors.collapse.observe(epoch, p.global_step),
                                 self.monitors.timing.observe(own_ms, epoch, p.global_step)) if i is not None]
        if self.world.distributed:  # one vote: digests, every rank's levels, a pending stop
            verdict = agreement.agree_boundary(self.world, self.model, incidents, self.signals.reason)
            if verdict.stop is not None and not self.stop.requested:
                self.stop.request(verdict.stop)
            incidents = agreement.boundary_incidents(verdict, incidents, epoch, p.global_step)
        for incident in sorted(incidents, key=lambda i: -i.level):
            self._handle(incident)  # a rollback raises out of here
        self._close_window()
        p.epoch, p.batch_in_epoch = epoch + 1, 0
        snapshot = self.snapshots.take()
        if (epoch + 1) % self.config.checkpoint.every_epochs == 0:
            self.checkpoints.save_async(snapshot)

    def _close_window(self) -> None:
        self._check_late(self.late.drain())  # nothing unread is proven healthy
        if self.snapshots.close_window():
            self.responses.progress()  # training got through a clean window

    # ---------------------------------------------------------------- the protocol
    def _handle(self, incident: Incident) -> None:
        self.snapshots.settle()  # a response may write the live tensors the last snapshot is copying
        self.snapshots.window_clean = False
        self.responses.rolled_back = False
        first = self.protocol.record_count()
        record = self.protocol.handle(incident, agree=self._agree_outcome if self.world.distributed else None)
        for late in (r for r in self.protocol.records_since(first) if r.late):
            # Late but successful: reported, never escalated (a deadline bounds a hang, not a success).
            self.events("emergency_late", TELEMETRY_LEVEL_WARNING, MESSAGE_PRIORITY_HIGH,
                        emergency_level=level_name(late.level), kind=late.kind, action=late.action,
                        duration_ms=round(late.duration_ms, 3), deadline_ms=late.deadline_ms)
        if self.responses.rolled_back:
            self.responses.rolled_back = False
            self.late.clear()  # losses still queued belong to steps the rollback discarded
            raise RolledBack(record.action)

    def _agree_outcome(self, ok: bool) -> bool:
        """A response succeeded only if it succeeded on every rank (else all escalate together)."""
        return not self.world.agree_flag(not ok)

    def _on_hang(self, incident: Incident) -> None:
        try:
            self.protocol.handle(incident)
        except ChannelError as exc:  # the watchdog thread: log, and the stalled step still resumes
            log.error("CRITICAL broadcast failed: %s", exc)

    def adopt_run_id(self, run_id: str) -> None:
        """A resumed run's id: the store's manifests and the protocol's signals carry it from now on."""
        self.checkpoints.adopt_run_id(run_id)
        self.protocol.run_id = run_id

    def summary(self) -> dict[str, Any]:
        return {"snapshot_cache": self.snapshots.summary(), **self.checkpoints.summary(),
                "watchdog_fired": self.watchdog.fired_total}
