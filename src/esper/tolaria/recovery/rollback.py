"""Two-phase rollback across participants (Tolaria, Kasmina, Tamiyo, ...) with per-phase deadlines.

    prepare(target) on every participant  -> any False/raise: abort(target) on all
    commit(target)  on every participant  -> any raise:       abort(target) on all
    confirm(target) on every participant  -> any False/raise: abort(target) on all

Deadlines: the fast tier gives prepare 150 ms, commit 250 ms, confirm 100 ms; the full tier gives
12 s to the three phases together. Phases run on the calling thread (the training thread is
stopped during a rollback anyway), so a deadline cannot cut a phase short: an overrun is seen only
once the phase has returned, and a phase that returned successfully, late, is recorded
(`RollbackOutcome.overruns`) and kept. Aborting it would throw away a restore that worked and make
the caller run a heavier one. A participant that hangs forever is the watchdog's business.

The coordinator reports; it does not escalate. The caller escalates a failed fast rollback to a
full one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Tier = Literal["fast", "full"]
PHASES = ("prepare", "commit", "confirm")
FAST_DEADLINES_MS = {"prepare": 150.0, "commit": 250.0, "confirm": 100.0}
FULL_TOTAL_MS = 12_000.0


@runtime_checkable
class RollbackParticipant(Protocol):
    """One component restored by a rollback.

    `prepare` checks the target can be restored and stages it (returns False or raises to refuse);
    `commit` makes the staged state live; `confirm` checks the live state is the target's;
    `abort` undoes whatever prepare/commit did and must not raise for a participant that never
    prepared."""

    name: str

    def prepare(self, target: Any) -> bool: ...

    def commit(self, target: Any) -> None: ...

    def confirm(self, target: Any) -> bool: ...

    def abort(self, target: Any) -> None: ...


@dataclass(frozen=True)
class RollbackOutcome:
    succeeded: bool
    tier: Tier
    phase_ms: dict[str, float]
    reason: str = ""
    failed_participant: str = ""
    abort_errors: list[str] = field(default_factory=list)
    overruns: list[str] = field(default_factory=list)  # phases that finished after their deadline

    @property
    def total_ms(self) -> float:
        return sum(self.phase_ms.values())


class PhaseFailed(Exception):
    """Internal: a phase refused, raised or overran; carries the participant and why."""

    def __init__(self, participant: str, reason: str) -> None:
        super().__init__(reason)
        self.participant = participant
        self.reason = reason


class RollbackCoordinator:
    """Runs prepare/commit/confirm across `participants` in order, under the tier's deadlines."""

    def __init__(self, participants: Sequence[RollbackParticipant], *,
                 fast_deadlines_ms: dict[str, float] | None = None, full_total_ms: float = FULL_TOTAL_MS,
                 clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        names = [p.name for p in participants]
        if len(set(names)) != len(names):
            raise ValueError(f"rollback participants need unique names, got {names}")
        deadlines = dict(FAST_DEADLINES_MS, **(fast_deadlines_ms or {}))
        if set(deadlines) != set(PHASES) or any(v <= 0 for v in deadlines.values()):
            raise ValueError(f"fast_deadlines_ms must give positive deadlines for {PHASES}, got {deadlines}")
        if full_total_ms <= 0:
            raise ValueError(f"full_total_ms={full_total_ms} must be positive")
        self.participants = list(participants)
        self.fast_deadlines_ms = deadlines
        self.full_total_ms = full_total_ms
        self._clock_ns = clock_ns

    def rollback(self, target: Any, tier: Tier = "fast") -> RollbackOutcome:
        """Restore every participant to `target`; on any failure all are aborted. Never raises for a
        participant's failure: the outcome says which participant failed, in which phase, and why."""
        if tier not in ("fast", "full"):
            raise ValueError(f"tier={tier!r}: use 'fast' or 'full'")
        phase_ms: dict[str, float] = {}
        for phase in PHASES:
            try:
                phase_ms[phase] = self._run_phase(phase, target, phase_ms)
            except PhaseFailed as failure:
                errors = self._abort_all(target)
                return RollbackOutcome(False, tier, phase_ms, f"{phase}: {failure.reason}",
                                       failure.participant, errors, self._overruns(tier, phase_ms))
        return RollbackOutcome(True, tier, phase_ms, overruns=self._overruns(tier, phase_ms))

    # ------------------------------------------------------------------ internals

    def _overruns(self, tier: Tier, phase_ms: dict[str, float]) -> list[str]:
        if tier == "full":
            total = sum(phase_ms.values())
            if total <= self.full_total_ms:
                return []
            return [f"the phases took {total:.1f} ms, over the full deadline of {self.full_total_ms:.1f} ms"]
        return [f"{phase} took {ms:.1f} ms, over the fast deadline of {self.fast_deadlines_ms[phase]:.1f} ms"
                for phase, ms in phase_ms.items() if ms > self.fast_deadlines_ms[phase]]

    def _run_phase(self, phase: str, target: Any, spent: dict[str, float]) -> float:
        start = self._clock_ns()
        for participant in self.participants:
            try:
                answer = getattr(participant, phase)(target)
            except Exception as exc:  # noqa: BLE001 - any participant error fails the phase; it is reported
                spent[phase] = (self._clock_ns() - start) / 1e6
                raise PhaseFailed(participant.name, f"{participant.name} raised {type(exc).__name__}: {exc}") from exc
            if phase != "commit" and answer is not True:
                spent[phase] = (self._clock_ns() - start) / 1e6
                raise PhaseFailed(participant.name, f"{participant.name} refused ({phase} returned {answer!r})")
        return (self._clock_ns() - start) / 1e6

    def _abort_all(self, target: Any) -> list[str]:
        errors = []
        for participant in reversed(self.participants):
            try:
                participant.abort(target)
            except Exception as exc:  # noqa: BLE001 - one failed abort must not skip the others; reported
                errors.append(f"{participant.name}.abort raised {type(exc).__name__}: {exc}")
        return errors
