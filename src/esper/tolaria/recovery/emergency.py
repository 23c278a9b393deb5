"""The four-level emergency protocol: signal, act within the level's deadline, escalate on failure.

Levels travel on the wire as Leyline `EmergencyLevel` values; the design's names map onto them in
the one table below (`LEVELS`), as the proto comment documents:

| design   | wire                             | deadline | action (the trainer's handler)          | escalates to  |
| -------- | -------------------------------- | -------- | --------------------------------------- | ------------- |
| MINOR    | EMERGENCY_LEVEL_NOTICE (1)       | 5 s      | log and adjust (e.g. scale the LR)      | MAJOR         |
| MAJOR    | EMERGENCY_LEVEL_ELEVATED (2)     | 2 s      | full rollback + checkpoint              | CRITICAL      |
| SEVERE   | EMERGENCY_LEVEL_CONSERVATIVE (3) | 500 ms   | fast rollback from the snapshot cache   | MAJOR         |
| CRITICAL | EMERGENCY_LEVEL_HALT (4)         | 100 ms   | freeze, broadcast over shm, gather acks | abort the run |

Why the chain is not "next number up": a SEVERE fault is answered by a *fast* rollback; if that
fails, the design's remedy is the *full* rollback, which is MAJOR's action. A MAJOR
that fails leaves nothing to recover to, so the run freezes (CRITICAL). A CRITICAL that fails
raises `EmergencyAbort`: the run must stop. A MINOR adjustment that fails becomes MAJOR.

Deadlines bound a *hanging* response; they do not judge one that returned. Handlers that mutate
training state (rollback) must run on the training thread, so `handle` cannot abandon them. It
measures the whole response (publish, broadcast, handler); a response that succeeded after its
deadline is recorded as late (`IncidentRecord.late`, logged, and reported by the caller's
telemetry) and is **not** escalated: escalating a rollback that worked would run a second,
heavier one (a MAJOR full rollback to a newer, unproven checkpoint after a SEVERE fast rollback
that took 600 ms; a halt after a MAJOR that waited 3 s on a big checkpoint's flush). Only a failed
response escalates. True hangs are the `Watchdog`'s job (monitors.py): it fires CRITICAL from its
own thread, and `handle` holds no lock while a handler runs, so that call is never blocked by the
hung one; work a handler waits on is bounded by its own timeouts (a checkpoint flush raises, which
fails the handler).

Under torchrun every rank handles the same incident at the same point; `handle(agree=...)` makes
the outcome one verdict too: a response that failed on any rank fails on every rank, so all of them
escalate together (a rank escalating alone would enter a collective the others never reach). The
watchdog's CRITICAL, raised on its own thread, passes no `agree`: a collective must never run there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from esper.leyline import (
    EMERGENCY_LEVEL_CONSERVATIVE,
    EMERGENCY_LEVEL_ELEVATED,
    EMERGENCY_LEVEL_HALT,
    EMERGENCY_LEVEL_NOTICE,
    LEYLINE_VERSION,
    EmergencyLevel,
    EmergencySignal,
    now_timestamp,
)
from esper.tolaria.distributed import PeerLost
from esper.tolaria.recovery.signal import ChannelError, EmergencyChannel, signal_checksum

log = logging.getLogger(__name__)

# The design's level names, as aliases of the Leyline wire values (not a second enum).
MINOR = EMERGENCY_LEVEL_NOTICE
MAJOR = EMERGENCY_LEVEL_ELEVATED
SEVERE = EMERGENCY_LEVEL_CONSERVATIVE
CRITICAL = EMERGENCY_LEVEL_HALT

ORIGIN = "tolaria"


@dataclass(frozen=True)
class LevelPolicy:
    name: str  # the design's name, for logs and the run summary
    deadline_s: float
    escalate_to: int | None  # None: failure aborts the run
    action: str


LEVELS: dict[int, LevelPolicy] = {
    MINOR: LevelPolicy("minor", 5.0, MAJOR, "log and adjust"),
    MAJOR: LevelPolicy("major", 2.0, CRITICAL, "full rollback + checkpoint"),
    SEVERE: LevelPolicy("severe", 0.5, MAJOR, "fast rollback"),
    CRITICAL: LevelPolicy("critical", 0.1, None, "freeze, broadcast, collect acks"),
}

LEVEL_NAMES: dict[int, str] = {level: policy.name for level, policy in LEVELS.items()}


def level_name(level: int | None) -> str:
    """The design's name of a wire level ("severe"), or "" for None."""
    if level is None:
        return ""
    return LEVEL_NAMES.get(level, f"unknown({level})")


def _policy(level: int) -> LevelPolicy:
    policy = LEVELS.get(level)
    if policy is None:
        raise ValueError(f"emergency level {level} is not one of {sorted(LEVELS)} (Leyline EmergencyLevel 1..4)")
    return policy


@dataclass(frozen=True)
class Incident:
    """What a monitor saw: the level it maps to, a short kind ("loss_nan"), and where it happened."""

    level: int
    kind: str
    reason: str
    epoch: int
    step: int
    attributes: Mapping[str, str] = field(default_factory=dict)


RESTORE_BEFORE_EPOCH = "restore_before_epoch"
"""An incident attribute: a full rollback restores a checkpoint that resumes before this epoch (the
state before that epoch's boundary applied its command), when one is kept."""


@dataclass(frozen=True)
class ActionResult:
    """What a level's handler did. `ok=False` escalates."""

    ok: bool
    action: str
    detail: str = ""


Handler = Callable[[Incident], ActionResult]


@dataclass
class IncidentRecord:
    """One response to one incident (an escalation is a record of its own)."""

    level: int
    kind: str
    reason: str
    epoch: int
    step: int
    action: str
    ok: bool
    duration_ms: float
    deadline_ms: float
    escalated_to: int | None = None
    detail: str = ""
    signal_seq: int = 0  # shared-memory sequence of a CRITICAL broadcast, 0 if none
    acked: tuple[int, ...] = ()
    unacked: tuple[int, ...] = ()
    publish_error: str = ""

    @property
    def deadline_missed(self) -> bool:
        return self.duration_ms > self.deadline_ms

    @property
    def late(self) -> bool:
        """Succeeded, after its deadline: recorded, not escalated."""
        return self.ok and self.deadline_missed

    def as_dict(self) -> dict[str, Any]:
        """Plain values for the run summary."""
        return {
            "level": level_name(self.level),
            "wire_level": self.level,
            "kind": self.kind,
            "reason": self.reason,
            "epoch": self.epoch,
            "step": self.step,
            "action": self.action,
            "ok": self.ok,
            "duration_ms": round(self.duration_ms, 3),
            "deadline_ms": self.deadline_ms,
            "deadline_missed": self.deadline_missed,
            "late": self.late,
            "escalated_to": level_name(self.escalated_to),
            "detail": self.detail,
            "signal_seq": self.signal_seq,
            "acked": list(self.acked),
            "unacked": list(self.unacked),
            "publish_error": self.publish_error,
        }


class EmergencyAbort(RuntimeError):
    """CRITICAL handling failed: the run cannot continue safely and must stop."""

    def __init__(self, record: IncidentRecord) -> None:
        super().__init__(
            f"emergency CRITICAL response failed at epoch {record.epoch} step {record.step} "
            f"({record.kind}: {record.reason}; {record.detail}): the run is stopped; resume from the "
            "last committed checkpoint after fixing the cause"
        )
        self.record = record


def build_signal(incident: Incident, run_id: str, origin: str = ORIGIN) -> EmergencySignal:
    """The Leyline EmergencySignal for `incident`, stamped and checksummed."""
    signal = EmergencySignal(
        version=LEYLINE_VERSION,
        level=EmergencyLevel.Name(incident.level),
        reason=incident.reason,
        origin=origin,
        monotonic_time_ms=time.monotonic_ns() // 1_000_000,
        run_id=run_id,
    )
    signal.triggered_at.CopyFrom(now_timestamp())
    signal.attributes.update({str(k): str(v) for k, v in incident.attributes.items()})
    signal.attributes.update(
        {"kind": incident.kind, "epoch": str(incident.epoch), "step": str(incident.step),
         "design_level": level_name(incident.level)}
    )
    signal.payload_checksum = signal_checksum(signal)
    return signal


class EmergencyProtocol:
    """Responds to incidents: signal, run the level's handler, measure, escalate (see module docstring).

    `handlers` must hold one handler per level. `publish` sends the signal on the emergency path
    (e.g. `TelemetryCollector.publish_emergency`, which bypasses the telemetry queue). `channel`,
    if given, receives CRITICAL signals and the protocol waits (within CRITICAL's deadline) for
    every live participant's ack; the raising process should not hold a participant slot itself
    (it would wait on its own ack)."""

    def __init__(
        self,
        handlers: Mapping[int, Handler],
        channel: EmergencyChannel | None = None,
        publish: Callable[[EmergencySignal], None] | None = None,
        run_id: str = "",
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        unknown = set(handlers) - set(LEVELS)
        if unknown:
            raise ValueError(
                f"handlers for unknown emergency levels {sorted(unknown)}: key them by MINOR/MAJOR/SEVERE/CRITICAL"
            )
        missing = [LEVELS[lvl].name for lvl in LEVELS if lvl not in handlers]
        if missing:
            raise ValueError(f"EmergencyProtocol needs a handler for every level; missing: {', '.join(missing)}")
        self.handlers = dict(handlers)
        self.channel = channel
        self.publish = publish
        self.run_id = run_id
        self.clock = clock
        self.records: list[IncidentRecord] = []
        self.signals: list[EmergencySignal] = []
        self._lock = threading.Lock()  # guards the lists only; never held while a handler runs

    def handle(self, incident: Incident, agree: Callable[[bool], bool] | None = None) -> IncidentRecord:
        """Respond to `incident` and to every escalation it causes; returns the final record.

        `agree` turns this process's outcome into every rank's (`ok` on all ranks, or not); it is
        asked after each level's handler, so escalations stay in step. Raises `EmergencyAbort` if
        the CRITICAL response fails. Safe to call from the watchdog thread (without `agree`) while
        the training thread is inside another handler."""
        _policy(incident.level)
        current = incident
        while True:
            record = self._respond(current, agree)
            if record.escalated_to is None:
                if current.level == CRITICAL and not record.ok:
                    raise EmergencyAbort(record)
                return record
            current = self._escalation(current, record)

    def summary(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.as_dict() for r in self.records]

    def records_since(self, index: int) -> list[IncidentRecord]:
        """Records appended after the first `index` (e.g. one `handle` call's chain)."""
        with self._lock:
            return self.records[index:]

    def record_count(self) -> int:
        with self._lock:
            return len(self.records)

    def _respond(self, incident: Incident, agree: Callable[[bool], bool] | None = None) -> IncidentRecord:
        policy = _policy(incident.level)
        start = self.clock()
        signal = build_signal(incident, self.run_id)
        publish_error = self._publish(signal)
        seq, acked, unacked = self._broadcast(signal, start + policy.deadline_s)
        result = self._run_handler(incident)
        if agree is not None:
            everywhere = agree(result.ok)  # a collective: every rank asks, whatever its own outcome
            if result.ok and not everywhere:
                result = ActionResult(False, result.action, f"{result.detail}; failed on another rank")
        duration_ms = (self.clock() - start) * 1000.0
        record = IncidentRecord(
            level=incident.level, kind=incident.kind, reason=incident.reason, epoch=incident.epoch,
            step=incident.step, action=result.action, ok=result.ok, duration_ms=duration_ms,
            deadline_ms=policy.deadline_s * 1000.0, detail=result.detail, signal_seq=seq,
            acked=acked, unacked=unacked, publish_error=publish_error,
        )
        if not record.ok:
            record.escalated_to = policy.escalate_to
            log.error("emergency %s %s: failed (%s, %.1f ms of %.0f ms)", policy.name, incident.kind,
                      result.detail, duration_ms, record.deadline_ms)
        elif record.late:
            log.warning("emergency %s %s: succeeded late (%s, %.1f ms of %.0f ms); not escalated", policy.name,
                        incident.kind, result.detail, duration_ms, record.deadline_ms)
        with self._lock:
            self.records.append(record)
            self.signals.append(signal)
        return record

    def _publish(self, signal: EmergencySignal) -> str:
        if self.publish is None:
            return ""
        try:
            self.publish(signal)
        except Exception as exc:  # noqa: BLE001 - any bus failure; recorded, and the response must go on
            log.exception("emergency signal could not be published")
            return f"{type(exc).__name__}: {exc}"
        return ""

    def _broadcast(self, signal: EmergencySignal, deadline: float) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        if self.channel is None or signal.level != CRITICAL:
            return 0, (), ()  # only CRITICAL freezes every process on the host
        try:
            seq = self.channel.raise_signal(signal)
            wanted = self.channel.live_participants()
            acked = self.channel.wait_for_acks(seq, wanted, timeout_s=max(0.0, deadline - self.clock()))
        except ChannelError as exc:
            log.error("CRITICAL broadcast failed: %s", exc)
            return 0, (), ()
        return seq, tuple(sorted(acked)), tuple(sorted(set(wanted) - acked))

    def _run_handler(self, incident: Incident) -> ActionResult:
        handler = self.handlers[incident.level]
        try:
            return handler(incident)
        except PeerLost:
            raise  # not a failed response: the process group is gone, and this rank must leave
        except Exception as exc:  # noqa: BLE001 - a failing handler is exactly what escalation is for
            log.exception("emergency handler for %s raised", level_name(incident.level))
            return ActionResult(ok=False, action=getattr(handler, "__name__", "handler"),
                                detail=f"raised {type(exc).__name__}: {exc}")

    @staticmethod
    def _escalation(incident: Incident, record: IncidentRecord) -> Incident:
        if record.escalated_to is None:
            raise ValueError("escalation requested for a record that does not escalate")
        reason = f"{level_name(incident.level)} response ({record.action}) failed: {incident.reason}"
        attributes = dict(incident.attributes)
        attributes["escalated_from"] = level_name(incident.level)
        return Incident(level=record.escalated_to, kind=incident.kind, reason=reason, epoch=incident.epoch,
                        step=incident.step, attributes=attributes)
