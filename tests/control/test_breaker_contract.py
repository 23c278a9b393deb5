"""Circuit breakers exactly: the counts at each transition, the cool-down counted in refused
calls, the bounded transition record, summaries and the board's state round trip."""

from __future__ import annotations

from esper.leyline import CIRCUIT_STATE_CLOSED, CIRCUIT_STATE_HALF_OPEN, CIRCUIT_STATE_OPEN
from esper.tolaria.control.breakers import BreakerBoard, CircuitBreaker


def test_the_defaults_open_at_three_failures_and_probe_after_two_refusals() -> None:
    breaker = CircuitBreaker("tamiyo")
    assert [breaker.record_failure(f"f{i}") for i in range(3)] == [False, False, True]
    assert breaker.state == CIRCUIT_STATE_OPEN and breaker.times_opened == 1 and breaker.refused == 0
    assert [breaker.allow(), breaker.allow()] == [False, True]
    assert breaker.state == CIRCUIT_STATE_HALF_OPEN and breaker.refused == 2


def test_opening_names_the_count_the_threshold_and_the_reason() -> None:
    breaker = CircuitBreaker("kasmina", failure_threshold=2)
    breaker.record_failure("first")
    breaker.record_failure("apply raised")
    assert breaker.transitions == [("CIRCUIT_STATE_OPEN", "2 consecutive failures (threshold 2): apply raised")]
    assert breaker.last_reason == "apply raised" and breaker.total_failures == 2


def test_a_closed_breaker_allows_without_counting_refusals() -> None:
    breaker = CircuitBreaker("lr_controller")
    assert all(breaker.allow() for _ in range(5)) and breaker.refused == 0 and breaker.transitions == []


def test_a_success_while_closed_moves_nothing_and_a_probe_success_closes() -> None:
    breaker = CircuitBreaker("checkpoint", failure_threshold=1, cooldown_calls=1)
    breaker.record_success()
    assert breaker.transitions == []
    breaker.record_failure("disk full")
    assert breaker.allow() and breaker.state == CIRCUIT_STATE_HALF_OPEN
    breaker.record_success()
    assert breaker.state == CIRCUIT_STATE_CLOSED and breaker.is_closed and breaker.consecutive_failures == 0
    assert [t[0] for t in breaker.transitions] == ["CIRCUIT_STATE_OPEN", "CIRCUIT_STATE_HALF_OPEN",
                                                   "CIRCUIT_STATE_CLOSED"]
    assert breaker.transitions[1][1] == "cool-down over: probing" and breaker.transitions[2][1] == "probe succeeded"


def test_a_failed_probe_reopens_at_once_and_counts_a_new_opening() -> None:
    breaker = CircuitBreaker("telemetry", failure_threshold=3, cooldown_calls=1)
    for i in range(3):
        breaker.record_failure(f"f{i}")
    breaker.allow()
    breaker.refused = 5
    assert breaker.record_failure("probe failed") is True
    assert breaker.state == CIRCUIT_STATE_OPEN and breaker.times_opened == 2 and breaker.refused == 0


def test_failures_past_the_threshold_while_open_do_not_reopen() -> None:
    breaker = CircuitBreaker("tamiyo", failure_threshold=1, cooldown_calls=5)
    breaker.record_failure("a")
    assert breaker.record_failure("b") is False and breaker.times_opened == 1


def test_the_transition_record_keeps_the_last_fifty() -> None:
    breaker = CircuitBreaker("tamiyo", failure_threshold=1, cooldown_calls=1)
    for i in range(30):
        breaker.record_failure(f"f{i}")
        breaker.allow()
    assert len(breaker.transitions) == 50
    assert breaker.transitions[-1] == ("CIRCUIT_STATE_HALF_OPEN", "cool-down over: probing")


def test_summary_and_state_name() -> None:
    breaker = CircuitBreaker("kasmina", failure_threshold=1)
    breaker.record_failure("boom")
    assert breaker.state_name == "OPEN"
    assert breaker.summary() == {"state": "OPEN", "failures": 1, "opened": 1, "last_reason": "boom"}


def test_the_board_defaults_to_the_breaker_defaults_and_names_each_breaker() -> None:
    board = BreakerBoard()
    assert all((b.name, b.failure_threshold, b.cooldown_calls) == (n, 3, 2) for n, b in board.breakers.items())


def test_the_board_round_trips_every_breaker_and_lists_the_open_ones() -> None:
    board = BreakerBoard(failure_threshold=1, cooldown_calls=3)
    assert list(board.breakers) == ["boundary_timing", "tamiyo", "kasmina", "checkpoint", "telemetry",
                                    "lr_controller"]
    assert all(b.failure_threshold == 1 and b.cooldown_calls == 3 for b in board.breakers.values())
    board["tamiyo"].record_failure("hung")
    board["checkpoint"].record_failure("disk full")
    board["checkpoint"].allow()
    assert board.open_names() == ["tamiyo", "checkpoint"]
    restored = BreakerBoard(failure_threshold=1, cooldown_calls=3)
    restored.load_state_dict(board.state_dict())
    assert restored.state_dict() == board.state_dict() and restored.summary() == board.summary()
    assert restored["checkpoint"].refused == 1 and restored["tamiyo"].last_reason == "hung"
    assert restored.state_dict()["tamiyo"] == {"state": CIRCUIT_STATE_OPEN, "consecutive_failures": 1,
                                               "total_failures": 1, "times_opened": 1, "refused": 0,
                                               "last_reason": "hung"}
