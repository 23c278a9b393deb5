"""The rollback coordinator's outcome after a failure (tier, timings, overruns, who aborted with
what) and its deadlines' exact limits. Timings come from a fake clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from esper.tolaria.recovery.rollback import PhaseFailed, RollbackCoordinator


@dataclass
class Clock:
    ns: int = 7_000_000_000  # a monotonic clock does not start at 0: a sum would show

    def __call__(self) -> int:
        return self.ns


@dataclass
class Part:
    name: str
    clock: Clock
    cost_ms: dict[str, float] = field(default_factory=dict)
    refuse: str = ""
    aborted_with: list[Any] = field(default_factory=list)

    def _spend(self, phase: str) -> bool:
        self.clock.ns += int(self.cost_ms.get(phase, 0.0) * 1e6)
        return phase != self.refuse

    def prepare(self, target: Any) -> bool:
        return self._spend("prepare")

    def commit(self, target: Any) -> None:
        self._spend("commit")

    def confirm(self, target: Any) -> bool:
        return self._spend("confirm")

    def abort(self, target: Any) -> None:
        self.aborted_with.append(target)


def test_a_failed_phase_reports_its_time_its_tier_and_aborts_everyone_with_the_target() -> None:
    clock = Clock()
    parts = [Part("tolaria", clock, cost_ms={"prepare": 4.0}), Part("kasmina", clock, cost_ms={"prepare": 3.0},
                                                                     refuse="prepare")]
    outcome = RollbackCoordinator(parts, clock_ns=clock).rollback("snap-9", tier="full")
    assert outcome.succeeded is False and outcome.tier == "full"
    assert outcome.phase_ms == {"prepare": 7.0}  # the failed phase's time up to the refusal
    assert outcome.reason == "prepare: kasmina refused (prepare returned False)"
    assert [p.aborted_with for p in parts] == [["snap-9"], ["snap-9"]]


def test_a_phase_that_raises_reports_the_time_it_took() -> None:
    clock = Clock()

    class Raises(Part):
        def commit(self, target: Any) -> None:
            self.clock.ns += 2_500_000
            raise RuntimeError("no memory")

    parts = [Part("tolaria", clock, cost_ms={"commit": 1.5}), Raises("kasmina", clock)]
    outcome = RollbackCoordinator(parts, clock_ns=clock).rollback("t")
    assert outcome.phase_ms["commit"] == 4.0 and outcome.reason == "commit: kasmina raised RuntimeError: no memory"


def test_a_late_phase_before_a_failure_is_still_reported_as_late() -> None:
    clock = Clock()
    parts = [Part("tolaria", clock, cost_ms={"prepare": 200.0}), Part("kasmina", clock, refuse="confirm")]
    outcome = RollbackCoordinator(parts, clock_ns=clock).rollback("t")
    assert not outcome.succeeded
    assert outcome.overruns == ["prepare took 200.0 ms, over the fast deadline of 150.0 ms"]
    full = RollbackCoordinator([Part("tolaria", clock, cost_ms={"prepare": 12_500.0}, refuse="confirm")],
                               clock_ns=clock).rollback("t", tier="full")
    assert full.overruns == ["the phases took 12500.0 ms, over the full deadline of 12000.0 ms"]


@pytest.mark.parametrize(("phase", "budget"), [("prepare", 150.0), ("commit", 250.0), ("confirm", 100.0)])
def test_a_fast_phase_that_takes_exactly_its_deadline_is_on_time(phase: str, budget: float) -> None:
    clock = Clock()
    outcome = RollbackCoordinator([Part("tolaria", clock, cost_ms={phase: budget})], clock_ns=clock).rollback("t")
    assert outcome.succeeded and outcome.overruns == []


def test_a_full_rollback_that_takes_exactly_its_budget_is_on_time() -> None:
    clock = Clock()
    part = Part("tolaria", clock, cost_ms={"prepare": 4000.0, "commit": 4000.0, "confirm": 4000.0})
    outcome = RollbackCoordinator([part], clock_ns=clock).rollback("t", tier="full")
    assert outcome.succeeded and outcome.overruns == []


def test_deadlines_down_to_a_millisecond_are_accepted_and_zero_is_refused() -> None:
    RollbackCoordinator([], fast_deadlines_ms={"prepare": 1.0, "commit": 1.0, "confirm": 1.0}, full_total_ms=1.0)
    with pytest.raises(ValueError, match="full_total_ms=0 must be positive"):
        RollbackCoordinator([], full_total_ms=0)


def test_a_phase_failure_reads_as_its_reason() -> None:
    failure = PhaseFailed("kasmina", "kasmina refused")
    assert str(failure) == "kasmina refused" and failure.participant == "kasmina"
