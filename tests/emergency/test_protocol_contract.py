"""The emergency protocol's exact contract: the incident record the run summary carries, the
signal's stamp and attributes, level names, what another rank's failure does, how long a
CRITICAL broadcast waits for acks, and what an abort carries."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from esper.leyline import EmergencySignal
from esper.tolaria.recovery.emergency import (
    CRITICAL,
    LEVELS,
    MAJOR,
    SEVERE,
    ActionResult,
    EmergencyAbort,
    EmergencyProtocol,
    Incident,
    IncidentRecord,
    build_signal,
    level_name,
)
from esper.tolaria.recovery.signal import ChannelError, EmergencyChannel


def _ok(level: int) -> Callable[[Incident], ActionResult]:
    return lambda incident: ActionResult(ok=True, action=LEVELS[level].action)


def _incident(level: int) -> Incident:
    return Incident(level=level, kind="loss_spike", reason="loss x12", epoch=3, step=120)


def test_an_incident_record_reaches_the_summary_with_every_field_named_and_rounded() -> None:
    record = IncidentRecord(level=SEVERE, kind="loss_spike", reason="loss x12", epoch=3, step=120,
                            action="fast rollback", ok=False, duration_ms=612.34567, deadline_ms=500.0,
                            escalated_to=MAJOR, detail="no healthy snapshot", signal_seq=7, acked=(2, 1),
                            unacked=(3,), publish_error="ConnectionError: down")
    assert record.as_dict() == {
        "level": "severe", "wire_level": SEVERE, "kind": "loss_spike", "reason": "loss x12", "epoch": 3,
        "step": 120, "action": "fast rollback", "ok": False, "duration_ms": 612.346, "deadline_ms": 500.0,
        "deadline_missed": True, "late": False, "escalated_to": "major", "detail": "no healthy snapshot",
        "signal_seq": 7, "acked": [2, 1], "unacked": [3], "publish_error": "ConnectionError: down"}


def test_level_names_and_an_unknown_level() -> None:
    assert [level_name(level) for level in LEVELS] == [p.name for p in LEVELS.values()]
    assert level_name(None) == "" and level_name(9) == "unknown(9)"
    protocol = EmergencyProtocol({level: _ok(level) for level in LEVELS})
    with pytest.raises(ValueError, match=r"emergency level 9 is not one of \[1, 2, 3, 4\]"):
        protocol.handle(Incident(level=9, kind="x", reason="x", epoch=0, step=0))


def test_a_signal_is_stamped_now_and_names_its_epoch_step_and_design_level() -> None:
    before = time.monotonic_ns() // 1_000_000
    signal = build_signal(_incident(CRITICAL), "run-1")
    after = time.monotonic_ns() // 1_000_000
    assert before <= signal.monotonic_time_ms <= after
    assert dict(signal.attributes) == {"kind": "loss_spike", "epoch": "3", "step": "120", "design_level": "critical"}


def test_a_response_that_failed_on_another_rank_escalates_here_too() -> None:
    asked: list[bool] = []

    def agree(ok: bool) -> bool:
        asked.append(ok)
        return len(asked) > 1  # the SEVERE response failed on some rank; the MAJOR one did not

    protocol = EmergencyProtocol({level: _ok(level) for level in LEVELS})
    final = protocol.handle(_incident(SEVERE), agree=agree)
    first = protocol.records[0]
    assert asked == [True, True]
    assert not first.ok and first.escalated_to == MAJOR and first.detail.endswith("failed on another rank")
    assert final.level == MAJOR and final.ok


@pytest.fixture()
def channel() -> Iterator[EmergencyChannel]:
    ch = EmergencyChannel.create(f"contract-{uuid.uuid4().hex[:10]}")
    yield ch
    ch.close()


def test_a_critical_broadcast_waits_for_acks_up_to_the_levels_deadline(channel: EmergencyChannel) -> None:
    channel.register_participant("supervisor")
    waits: list[float] = []
    real_wait = channel.wait_for_acks

    def recorded(seq: int, participants: list[int], timeout_s: float) -> set[int]:
        waits.append(timeout_s)
        return real_wait(seq, participants, 0.0)

    channel.wait_for_acks = recorded  # type: ignore[method-assign]
    EmergencyProtocol({level: _ok(level) for level in LEVELS}, channel=channel).handle(_incident(CRITICAL))
    [timeout] = waits
    assert 0.05 < timeout <= LEVELS[CRITICAL].deadline_s


def test_a_failed_critical_response_aborts_carrying_its_record() -> None:
    handlers = {level: _ok(level) for level in LEVELS}
    handlers[CRITICAL] = lambda incident: ActionResult(ok=False, action="freeze", detail="ranks did not ack")
    with pytest.raises(EmergencyAbort, match="resume from the last committed checkpoint") as caught:
        EmergencyProtocol(handlers).handle(_incident(CRITICAL))
    record = caught.value.record
    assert (record.level, record.ok, record.detail) == (CRITICAL, False, "ranks did not ack")


# ------------------------------------------------------------------ what a response records and logs

LOGGER = "esper.tolaria.recovery.emergency"


def test_a_response_records_its_kind_deadline_signal_and_a_clean_publish() -> None:
    published: list[object] = []
    protocol = EmergencyProtocol({level: _ok(level) for level in LEVELS}, publish=published.append)
    record = protocol.handle(_incident(SEVERE))
    assert (record.kind, record.deadline_ms, record.publish_error) == ("loss_spike", 500.0, "")
    assert protocol.signals == published and len(published) == 1


def test_a_failed_response_is_logged_as_an_error_naming_level_kind_detail_and_times(
        caplog: pytest.LogCaptureFixture) -> None:
    handlers = {level: _ok(level) for level in LEVELS}
    handlers[SEVERE] = lambda incident: ActionResult(ok=False, action="fast rollback", detail="no snapshot")
    with caplog.at_level("WARNING", logger=LOGGER):
        EmergencyProtocol(handlers).handle(_incident(SEVERE))
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert error.getMessage().startswith("emergency severe loss_spike: failed (no snapshot, ")
    assert error.getMessage().endswith(" ms of 500 ms)")


def test_a_late_success_is_logged_as_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]

    def slow(incident: Incident) -> ActionResult:
        now[0] += 1.0  # a second, against SEVERE's 0.5 s
        return ActionResult(ok=True, action="fast rollback", detail="restored e0002")

    handlers = {level: _ok(level) for level in LEVELS}
    handlers[SEVERE] = slow
    with caplog.at_level("WARNING", logger=LOGGER):
        record = EmergencyProtocol(handlers, clock=lambda: now[0]).handle(_incident(SEVERE))
    assert record.late and record.escalated_to is None
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warning.getMessage() == ("emergency severe loss_spike: succeeded late (restored e0002, 1000.0 ms of "
                                    "500 ms); not escalated")


def test_a_raising_handler_fails_under_its_own_name_and_is_logged_with_its_level(
        caplog: pytest.LogCaptureFixture) -> None:
    def restore_from_disk(incident: Incident) -> ActionResult:
        raise OSError("disk gone")

    handlers = {level: _ok(level) for level in LEVELS}
    handlers[MAJOR] = restore_from_disk
    with caplog.at_level("ERROR", logger=LOGGER):
        protocol = EmergencyProtocol(handlers)
        protocol.handle(_incident(MAJOR))
    first = protocol.records[0]
    assert first.ok is False and first.action == "restore_from_disk"
    assert first.detail == "raised OSError: disk gone"
    assert any(r.getMessage() == "emergency handler for major raised" and r.exc_info for r in caplog.records)


def test_a_failing_publisher_is_recorded_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    def down(signal: object) -> None:
        raise ConnectionError("redis down")

    with caplog.at_level("ERROR", logger=LOGGER):
        record = EmergencyProtocol({level: _ok(level) for level in LEVELS}, publish=down).handle(_incident(SEVERE))
    assert record.ok and record.publish_error == "ConnectionError: redis down"
    assert any(r.getMessage() == "emergency signal could not be published" and r.exc_info for r in caplog.records)


def test_a_broken_channel_leaves_no_broadcast_and_the_response_runs(
        channel: EmergencyChannel, caplog: pytest.LogCaptureFixture) -> None:
    def broken(signal: object) -> int:
        raise ChannelError("segment unmapped")

    channel.raise_signal = broken  # type: ignore[method-assign,assignment]
    with caplog.at_level("ERROR", logger=LOGGER):
        record = EmergencyProtocol({level: _ok(level) for level in LEVELS}, channel=channel).handle(
            _incident(CRITICAL))
    assert record.ok and (record.signal_seq, record.acked, record.unacked) == (0, (), ())
    assert any(r.getMessage() == "CRITICAL broadcast failed: segment unmapped" for r in caplog.records)


def test_a_raising_handler_without_a_name_fails_as_handler() -> None:
    class Restore:
        def __call__(self, incident: Incident) -> ActionResult:
            raise RuntimeError("no checkpoint")

    handlers = {level: _ok(level) for level in LEVELS}
    handlers[MAJOR] = Restore()
    protocol = EmergencyProtocol(handlers)
    protocol.handle(_incident(MAJOR))
    assert protocol.records[0].action == "handler" and protocol.records[0].ok is False


def test_handlers_must_be_keyed_by_exactly_the_four_levels() -> None:
    handlers = {level: _ok(level) for level in LEVELS}
    with pytest.raises(ValueError, match=r"handlers for unknown emergency levels \[0, 9\]: key them by MINOR"):
        EmergencyProtocol({**handlers, 9: _ok(MAJOR), 0: _ok(MAJOR)})
    with pytest.raises(ValueError, match="missing: severe, critical$"):
        EmergencyProtocol({level: h for level, h in handlers.items() if level not in (SEVERE, CRITICAL)})


def test_a_protocol_without_a_run_id_signals_an_empty_one() -> None:
    published: list[EmergencySignal] = []
    EmergencyProtocol({level: _ok(level) for level in LEVELS}, publish=published.append).handle(_incident(SEVERE))
    assert [s.run_id for s in published] == [""]
