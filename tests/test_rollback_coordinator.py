"""RollbackCoordinator: success, a failure in each phase aborts everyone, overruns are reported, not aborted."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from esper.tolaria.recovery.rollback import RollbackCoordinator, RollbackParticipant


class FakeClock:
    """Monotonic nanoseconds that participants advance to simulate slow phases."""

    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns

    def advance_ms(self, ms: float) -> None:
        self.ns += int(ms * 1e6)


@dataclass
class Participant:
    name: str
    clock: FakeClock
    fail_in: str = ""
    mode: str = "refuse"  # "refuse" (return False) or "raise"
    cost_ms: dict[str, float] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    live: Any = "old"

    def _step(self, phase: str) -> bool:
        self.calls.append(phase)
        self.clock.advance_ms(self.cost_ms.get(phase, 1.0))
        if self.fail_in == phase:
            if self.mode == "raise":
                raise RuntimeError(f"{self.name} cannot {phase}")
            return False
        return True

    def prepare(self, target: Any) -> bool:
        return self._step("prepare")

    def commit(self, target: Any) -> None:
        self._step("commit")
        self.live = target

    def confirm(self, target: Any) -> bool:
        return self._step("confirm") and self.live == target

    def abort(self, target: Any) -> None:
        self.calls.append("abort")
        self.live = "old"


def _trio(clock: FakeClock, **overrides: Any) -> list[Participant]:
    return [Participant(name, clock, **overrides.get(name, {})) for name in ("tolaria", "kasmina", "tamiyo")]


def test_participants_satisfy_the_protocol() -> None:
    assert isinstance(Participant("x", FakeClock()), RollbackParticipant)


def test_success_runs_three_phases_on_everyone_and_times_each() -> None:
    clock = FakeClock()
    parts = _trio(clock)
    outcome = RollbackCoordinator(parts, clock_ns=clock).rollback("snap-7")
    assert outcome.succeeded and outcome.tier == "fast" and outcome.reason == ""
    assert outcome.phase_ms == {"prepare": 3.0, "commit": 3.0, "confirm": 3.0}
    assert all(p.calls == ["prepare", "commit", "confirm"] and p.live == "snap-7" for p in parts)


# commit returns nothing, so it can only fail by raising
@pytest.mark.parametrize(("phase", "mode"), [("prepare", "refuse"), ("prepare", "raise"), ("commit", "raise"),
                                             ("confirm", "refuse"), ("confirm", "raise")])
def test_failure_in_any_phase_aborts_all_participants(phase: str, mode: str) -> None:
    clock = FakeClock()
    parts = _trio(clock, kasmina={"fail_in": phase, "mode": mode})
    outcome = RollbackCoordinator(parts, clock_ns=clock).rollback("snap-7")
    assert not outcome.succeeded and outcome.failed_participant == "kasmina"
    assert outcome.reason.startswith(f"{phase}: kasmina ")
    assert ("raised RuntimeError: kasmina cannot" in outcome.reason) == (mode == "raise")
    assert all(p.calls[-1] == "abort" and p.live == "old" for p in parts)
    assert "tamiyo" not in outcome.reason and parts[2].calls.count(phase) == 0
    assert phase in outcome.phase_ms


def test_confirm_that_sees_wrong_state_fails() -> None:
    clock = FakeClock()
    parts = _trio(clock)

    def broken_commit(target: Any) -> None:
        parts[1].calls.append("commit")

    parts[1].commit = broken_commit  # type: ignore[method-assign]
    outcome = RollbackCoordinator(parts, clock_ns=clock).rollback("snap-7")
    assert not outcome.succeeded and outcome.failed_participant == "kasmina"
    assert outcome.reason == "confirm: kasmina refused (confirm returned False)"


@pytest.mark.parametrize(("phase", "budget"), [("prepare", 150), ("commit", 250), ("confirm", 100)])
def test_a_fast_phase_that_succeeds_late_is_kept_and_reported(phase: str, budget: int) -> None:
    clock = FakeClock()
    parts = _trio(clock, tamiyo={"cost_ms": {phase: budget + 5}})
    outcome = RollbackCoordinator(parts, clock_ns=clock).rollback("snap-7")
    assert outcome.succeeded and outcome.reason == ""
    assert outcome.overruns == [f"{phase} took {budget + 7:.1f} ms, over the fast deadline of {budget:.1f} ms"]
    assert outcome.phase_ms[phase] == budget + 7
    assert all("abort" not in p.calls and p.live == "snap-7" for p in parts)


def test_full_tier_shares_one_twelve_second_budget() -> None:
    clock = FakeClock()
    slow = _trio(clock, tolaria={"cost_ms": {"prepare": 5000, "commit": 5000}})
    within = RollbackCoordinator(slow, clock_ns=clock).rollback("t", tier="full")
    assert within.succeeded and within.overruns == []
    clock2 = FakeClock()
    too_slow = _trio(clock2, tolaria={"cost_ms": {"prepare": 5000, "commit": 5000, "confirm": 2500}})
    outcome = RollbackCoordinator(too_slow, clock_ns=clock2).rollback("t", tier="full")
    assert outcome.succeeded and outcome.tier == "full"
    assert outcome.overruns == ["the phases took 12506.0 ms, over the full deadline of 12000.0 ms"]


def test_abort_errors_are_reported_and_do_not_skip_other_aborts() -> None:
    clock = FakeClock()
    parts = _trio(clock, tamiyo={"fail_in": "prepare"})

    def bad_abort(target: Any) -> None:
        raise OSError("link down")

    parts[1].abort = bad_abort  # type: ignore[method-assign]
    outcome = RollbackCoordinator(parts, clock_ns=clock).rollback("t")
    assert outcome.abort_errors == ["kasmina.abort raised OSError: link down"]
    assert parts[0].calls[-1] == "abort" and parts[2].calls[-1] == "abort"


def test_real_clock_measures_phases() -> None:
    outcome = RollbackCoordinator(_trio(FakeClock())).rollback("t")
    assert outcome.succeeded and set(outcome.phase_ms) == {"prepare", "commit", "confirm"}
    assert all(v >= 0 for v in outcome.phase_ms.values())


def test_invalid_configuration_is_refused() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="unique names"):
        RollbackCoordinator([Participant("a", clock), Participant("a", clock)])
    with pytest.raises(ValueError, match="positive deadlines"):
        RollbackCoordinator([], fast_deadlines_ms={"prepare": 0})
    with pytest.raises(ValueError, match="tier='slow'"):
        RollbackCoordinator([]).rollback("t", tier="slow")  # type: ignore[arg-type]
