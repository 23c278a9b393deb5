"""Breakers record failures and decide at one point; conservative mode follows them by its rule."""

from __future__ import annotations

from esper.leyline import CIRCUIT_STATE_CLOSED, CIRCUIT_STATE_HALF_OPEN, CIRCUIT_STATE_OPEN
from esper.tolaria.control.breakers import BreakerBoard, CircuitBreaker
from esper.tolaria.control.conservative import ConservativeMode


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    b = CircuitBreaker("tamiyo", failure_threshold=3, cooldown_calls=2)
    assert not b.record_failure("t1") and not b.record_failure("t2")
    assert b.record_failure("t3")
    assert b.state == CIRCUIT_STATE_OPEN
    assert "3 consecutive failures (threshold 3): t3" in b.transitions[-1][1]


def test_success_resets_the_consecutive_count() -> None:
    b = CircuitBreaker("x", failure_threshold=2)
    b.record_failure("a")
    b.record_success()
    assert not b.record_failure("b")
    assert b.state == CIRCUIT_STATE_CLOSED


def test_open_breaker_refuses_then_probes_half_open_and_closes_on_success() -> None:
    b = CircuitBreaker("x", failure_threshold=1, cooldown_calls=2)
    b.record_failure("boom")
    assert b.allow() is False
    assert b.allow() is True and b.state == CIRCUIT_STATE_HALF_OPEN
    b.record_success()
    assert b.state == CIRCUIT_STATE_CLOSED


def test_failed_probe_reopens() -> None:
    b = CircuitBreaker("x", failure_threshold=1, cooldown_calls=1)
    b.record_failure("boom")
    assert b.allow() and b.state == CIRCUIT_STATE_HALF_OPEN
    assert b.record_failure("again")
    assert b.state == CIRCUIT_STATE_OPEN and b.times_opened == 2


def test_breaker_state_round_trips() -> None:
    board = BreakerBoard(failure_threshold=1)
    board["kasmina"].record_failure("x")
    other = BreakerBoard(failure_threshold=1)
    other.load_state_dict(board.state_dict())
    assert other.open_names() == ["kasmina"] and other["kasmina"].last_reason == "x"


def test_conservative_mode_enters_on_open_breaker_and_leaves_after_healthy_epochs() -> None:
    mode = ConservativeMode(healthy_epochs_to_exit=2)
    assert mode.update(0, [], []) is None
    assert mode.update(1, ["tamiyo"], ["tamiyo: timeout"]) == "entered"
    assert mode.active and "tamiyo: timeout" in mode.reasons[0]
    assert mode.update(2, ["tamiyo"], ["tamiyo: timeout"]) is None
    assert mode.update(3, [], []) is None and mode.active
    assert mode.update(4, [], []) == "exited"
    assert not mode.active and mode.epochs == [1, 2, 3]


def test_a_relapse_restarts_the_healthy_streak() -> None:
    mode = ConservativeMode(healthy_epochs_to_exit=2)
    mode.update(0, ["kasmina"], ["x"])
    mode.update(1, [], [])
    mode.update(2, ["kasmina"], ["x"])
    assert mode.update(3, [], []) is None and mode.active
