"""EmergencyProtocol: handlers per level, escalation chain, deadlines, signals on the wire."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from esper.leyline import (
    EMERGENCY_LEVEL_CONSERVATIVE,
    EMERGENCY_LEVEL_ELEVATED,
    EMERGENCY_LEVEL_HALT,
    EMERGENCY_LEVEL_NOTICE,
    EmergencySignal,
)
from esper.tolaria.recovery.emergency import (
    CRITICAL,
    LEVELS,
    MAJOR,
    MINOR,
    SEVERE,
    ActionResult,
    EmergencyAbort,
    EmergencyProtocol,
    Incident,
)
from esper.tolaria.recovery.signal import EmergencyChannel, signal_checksum


class FakeClock:
    """perf_counter stand-in: handlers advance it to simulate slow work without sleeping."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[tuple[int, str]] = []
        self.outcomes: dict[int, Callable[[Incident], ActionResult]] = {}

    def handler(self, level: int) -> Callable[[Incident], ActionResult]:
        def handle(incident: Incident) -> ActionResult:
            self.calls.append((level, incident.kind))
            outcome = self.outcomes.get(level)
            return outcome(incident) if outcome else ActionResult(ok=True, action=LEVELS[level].action)

        return handle


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture()
def recorder(clock: FakeClock) -> Recorder:
    return Recorder(clock)


def _protocol(recorder: Recorder, clock: FakeClock, published: list[EmergencySignal],
              channel: EmergencyChannel | None = None) -> EmergencyProtocol:
    handlers = {level: recorder.handler(level) for level in LEVELS}
    return EmergencyProtocol(handlers, channel=channel, publish=published.append, run_id="run-1", clock=clock)


def _incident(level: int, kind: str = "fault") -> Incident:
    return Incident(level=level, kind=kind, reason=f"{kind} happened", epoch=3, step=120, attributes={"x": "1"})


def test_design_levels_map_to_the_documented_wire_levels() -> None:
    assert (MINOR, MAJOR, SEVERE, CRITICAL) == (
        EMERGENCY_LEVEL_NOTICE, EMERGENCY_LEVEL_ELEVATED, EMERGENCY_LEVEL_CONSERVATIVE, EMERGENCY_LEVEL_HALT)
    assert {p.name: p.deadline_s for p in LEVELS.values()} == {
        "critical": 0.1, "severe": 0.5, "major": 2.0, "minor": 5.0}


@pytest.mark.parametrize("level", [MINOR, MAJOR, SEVERE, CRITICAL])
def test_each_level_calls_its_handler_and_publishes_a_signal_at_its_wire_level(
    level: int, recorder: Recorder, clock: FakeClock
) -> None:
    published: list[EmergencySignal] = []
    record = _protocol(recorder, clock, published).handle(_incident(level, "nan_loss"))
    assert recorder.calls == [(level, "nan_loss")]
    assert record.ok and record.escalated_to is None and record.level == level
    [signal] = published
    assert signal.level == level and signal.origin == "tolaria" and signal.run_id == "run-1"
    assert signal.reason == "nan_loss happened" and signal.version >= 1
    assert signal.attributes["kind"] == "nan_loss" and signal.attributes["step"] == "120"
    assert signal.attributes["x"] == "1" and signal.triggered_at.seconds > 0 and signal.monotonic_time_ms > 0
    assert signal.payload_checksum == signal_checksum(signal)


def test_failed_fast_rollback_escalates_to_full_rollback(recorder: Recorder, clock: FakeClock) -> None:
    published: list[EmergencySignal] = []
    recorder.outcomes[SEVERE] = lambda i: ActionResult(ok=False, action="fast rollback", detail="no healthy snapshot")
    protocol = _protocol(recorder, clock, published)
    final = protocol.handle(_incident(SEVERE, "loss_spike"))
    assert recorder.calls == [(SEVERE, "loss_spike"), (MAJOR, "loss_spike")]
    assert [s.level for s in published] == [SEVERE, MAJOR]
    assert final.level == MAJOR and final.ok
    first = protocol.records[0].as_dict()
    assert first["level"] == "severe" and first["escalated_to"] == "major" and not first["ok"]
    assert first["detail"] == "no healthy snapshot"
    assert published[1].attributes["escalated_from"] == "severe"


def test_the_full_chain_runs_minor_major_critical_then_aborts(recorder: Recorder, clock: FakeClock) -> None:
    published: list[EmergencySignal] = []

    def boom(incident: Incident) -> ActionResult:
        raise RuntimeError("disk on fire")

    for level in LEVELS:
        recorder.outcomes[level] = boom
    protocol = _protocol(recorder, clock, published)
    with pytest.raises(EmergencyAbort, match="CRITICAL response failed at epoch 3 step 120"):
        protocol.handle(_incident(MINOR, "slow_boundary"))
    assert [level for level, _ in recorder.calls] == [MINOR, MAJOR, CRITICAL]
    assert [s.level for s in published] == [MINOR, MAJOR, CRITICAL]
    assert all("raised RuntimeError: disk on fire" in r.detail for r in protocol.records)
    assert [r["escalated_to"] for r in protocol.summary()] == ["major", "critical", ""]


@pytest.mark.parametrize(("level", "seconds"), [(SEVERE, 0.6), (MAJOR, 3.0), (MINOR, 6.0)])
def test_a_handler_that_succeeds_late_is_recorded_late_not_escalated(
        recorder: Recorder, clock: FakeClock, level: int, seconds: float) -> None:
    published: list[EmergencySignal] = []

    def slow(incident: Incident) -> ActionResult:
        clock.now += seconds  # over the level's deadline (500 ms, 2 s, 5 s), and it worked
        return ActionResult(ok=True, action="rollback")

    recorder.outcomes[level] = slow
    protocol = _protocol(recorder, clock, published)
    final = protocol.handle(_incident(level))
    assert protocol.records == [final] and [s.level for s in published] == [level]
    assert final.ok and final.late and final.deadline_missed and final.escalated_to is None
    assert final.duration_ms == pytest.approx(seconds * 1000)
    assert protocol.summary()[0]["late"] is True


def test_a_handler_that_fails_still_escalates_in_time_or_not(recorder: Recorder, clock: FakeClock) -> None:
    def slow_failure(incident: Incident) -> ActionResult:
        clock.now += 0.6
        return ActionResult(ok=False, action="fast rollback", detail="participant refused")

    recorder.outcomes[SEVERE] = slow_failure
    final = _protocol(recorder, clock, []).handle(_incident(SEVERE))
    assert final.level == MAJOR and final.ok and "severe response (fast rollback) failed" in final.reason


def test_a_late_but_successful_critical_is_recorded_not_aborted(recorder: Recorder, clock: FakeClock) -> None:
    def late(incident: Incident) -> ActionResult:
        clock.now += 0.2
        return ActionResult(ok=True, action="freeze")

    recorder.outcomes[CRITICAL] = late
    record = _protocol(recorder, clock, []).handle(_incident(CRITICAL))
    assert record.ok and record.deadline_missed and record.escalated_to is None


def test_a_failing_publisher_does_not_stop_the_response(recorder: Recorder, clock: FakeClock) -> None:
    def broken(signal: EmergencySignal) -> None:
        raise ConnectionError("redis is down")

    handlers = {level: recorder.handler(level) for level in LEVELS}
    protocol = EmergencyProtocol(handlers, publish=broken, run_id="r", clock=clock)
    record = protocol.handle(_incident(SEVERE))
    assert record.ok and record.publish_error == "ConnectionError: redis is down"


def test_every_level_needs_a_handler(recorder: Recorder) -> None:
    with pytest.raises(ValueError, match="missing: critical"):
        EmergencyProtocol({lvl: recorder.handler(lvl) for lvl in (MINOR, MAJOR, SEVERE)})


@pytest.fixture()
def channel() -> Iterator[EmergencyChannel]:
    ch = EmergencyChannel.create(f"proto-{uuid.uuid4().hex[:10]}")
    yield ch
    ch.close()


def test_critical_is_broadcast_on_the_channel_and_acks_are_recorded(
    recorder: Recorder, clock: FakeClock, channel: EmergencyChannel
) -> None:
    acker = channel.register_participant("supervisor")
    silent = channel.register_participant("stuck-worker")

    def freeze(incident: Incident) -> ActionResult:
        got = channel.read(0)  # the broadcast happened before the handler ran
        assert got is not None and got.signal.level == EMERGENCY_LEVEL_HALT
        return ActionResult(ok=True, action="freeze")

    recorder.outcomes[CRITICAL] = freeze
    real_wait = channel.wait_for_acks

    def ack_then_wait(seq: int, participants: list[int], timeout_s: float) -> set[int]:
        channel.ack(acker, seq)  # stands in for the supervisor process acknowledging
        return real_wait(seq, participants, min(timeout_s, 0.01))

    channel.wait_for_acks = ack_then_wait  # type: ignore[method-assign]
    protocol = _protocol(recorder, clock, [], channel=channel)
    record = protocol.handle(_incident(CRITICAL, "step_hung"))
    assert record.signal_seq == channel.sequence() and record.acked == (acker,) and record.unacked == (silent,)
    severe = protocol.handle(_incident(SEVERE))
    assert severe.signal_seq == 0  # only CRITICAL goes over shared memory
