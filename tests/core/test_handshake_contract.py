"""The handshake's contract in detail: the deadline caller's race at the deadline and its counts,
what each outcome carries (kind, message, latency, the no-op's fields), the command checks'
limits, and which commands are germinations. Latencies are read from a fake clock."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

import esper.tolaria.loop.handshake as handshake
from esper.leyline import (
    SEED_OP_CULL,
    SEED_OP_GERMINATE,
    AdaptationCommand,
    SystemStatePacket,
    is_noop,
    noop_command,
    seed_command,
    system_state_packet,
)
from esper.oona import CommandRejected
from esper.tolaria.loop.handshake import DeadlineCaller, TamiyoHandshake, is_germination

NOW = 1_700_000_000.0


def _packet() -> SystemStatePacket:
    return system_state_packet(epoch=1, global_step=10, training_loss=1.0, validation_loss=1.0,
                               validation_accuracy=0.5)


def _command(age_s: float = 0.0) -> AdaptationCommand:
    cmd = seed_command(SEED_OP_GERMINATE, issued_by="tamiyo", target_seed_id="stem", blueprint_id="residual_mlp")
    cmd.issued_at.FromNanoseconds(int((NOW - age_s) * 1e9))
    return cmd


class Tamiyo:
    def __init__(self, answer: Any = None, error: BaseException | None = None) -> None:
        self.answer, self.error = answer, error
        self.release = threading.Event()
        self.hang = False

    def evaluate_epoch(self, packet: SystemStatePacket) -> Any:
        if self.hang:
            self.release.wait(30)
        if self.error is not None:
            raise self.error
        return self.answer


@pytest.fixture
def perf_counter(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The handshake's perf_counter: each read returns the next value (start, then end)."""
    values = [100.0, 100.25]
    monkeypatch.setattr(handshake.time, "perf_counter", lambda: values.pop(0) if len(values) > 1 else values[0])
    yield values


def test_prompt_calls_leave_nothing_abandoned_and_reuse_one_worker() -> None:
    caller = DeadlineCaller()
    threads_before = set(threading.enumerate())  # other tests' threads may end meanwhile: count only new ones
    assert [caller.call(lambda x: x * 2, n, 5.0) for n in range(5)] == [0, 2, 4, 6, 8]
    assert (caller.abandoned, caller.returned_late) == (0, 0)
    assert set(threading.enumerate()) - threads_before == set()
    caller.close()


def test_a_call_that_finishes_just_as_the_deadline_expires_is_used_not_abandoned(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    class DoneAtTheDeadline(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            super().wait(5.0)
            return False  # the wait timed out, and the call finished in the same instant

    real_call = handshake._Call

    def call(fn: Any, arg: Any) -> Any:
        made = real_call(fn, arg)
        made.done = DoneAtTheDeadline()
        return made

    caller = DeadlineCaller()
    monkeypatch.setattr(handshake, "_Call", call)
    assert caller.call(lambda x: x + 1, 41, 0.01) == 42
    assert caller.abandoned == 0
    monkeypatch.undo()
    assert caller.call(lambda x: x, "the same worker still answers", 5.0) == "the same worker still answers"
    caller.close()


def test_the_default_handshake_refuses_after_four_hung_calls() -> None:
    tamiyo = Tamiyo(_command())
    tamiyo.hang = True
    shake = TamiyoHandshake(tamiyo, timeout_s=0.01, clock=lambda: NOW)
    kinds = [shake.exchange(_packet()).failure_kind for _ in range(5)]
    assert kinds == ["timeout", "timeout", "timeout", "timeout", "refused"]
    tamiyo.release.set()
    shake.close()


def test_the_default_command_age_limit_is_sixty_seconds() -> None:
    shake = TamiyoHandshake(Tamiyo(), timeout_s=1.0, clock=lambda: NOW)
    assert shake.verify(_command(age_s=60.0)) is not None  # the limit itself is allowed
    old = _command(age_s=60.5)
    with pytest.raises(handshake.HandshakeError) as info:
        shake.verify(old)
    assert info.value.kind == "expired"
    assert str(info.value) == f"command {old.command_id} issued 60.5 s ago (limit 60 s)"
    shake.close()


def test_a_fresh_command_is_not_expired_at_todays_epoch() -> None:
    # seconds since 1970 are ~1.7e9: the age must come from exact nanoseconds, not a rounded scale
    shake = TamiyoHandshake(Tamiyo(), timeout_s=1.0, command_max_age_s=1.0, clock=lambda: NOW)
    shake.verify(_command(age_s=0.5))
    shake.close()


def test_a_command_without_issued_at_is_invalid() -> None:
    cmd = _command()
    cmd.ClearField("issued_at")
    shake = TamiyoHandshake(Tamiyo(cmd), timeout_s=1.0, clock=lambda: NOW)
    outcome = shake.exchange(_packet())
    assert (outcome.failure_kind, outcome.failure) == ("invalid", "command has no issued_at")
    shake.close()


def test_the_verifier_sees_the_answer_and_its_rejection_is_named() -> None:
    seen: list[AdaptationCommand] = []
    cmd = _command()

    def verifier(answer: AdaptationCommand) -> None:
        seen.append(answer)
        raise LookupError("unknown sender")

    shake = TamiyoHandshake(Tamiyo(cmd), timeout_s=1.0, clock=lambda: NOW, verifier=verifier)
    outcome = shake.exchange(_packet())
    assert seen == [cmd]
    assert (outcome.failure_kind, outcome.failure) == ("rejected", "LookupError: unknown sender")
    shake.close()


def test_a_remote_client_that_rejected_the_reply_itself_falls_back_as_rejected() -> None:
    shake = TamiyoHandshake(Tamiyo(error=CommandRejected("forged", "HMAC mismatch")), timeout_s=1.0, clock=lambda: NOW)
    outcome = shake.exchange(_packet())
    assert outcome.fallback and outcome.is_failure and outcome.failure_kind == "rejected"
    shake.close()


def test_missing_a_shortened_deadline_says_both_deadlines() -> None:
    tamiyo = Tamiyo(_command())
    tamiyo.hang = True
    shake = TamiyoHandshake(tamiyo, timeout_s=2.0, clock=lambda: NOW)
    outcome = shake.exchange(_packet(), timeout_s=0.02)
    assert outcome.failure_kind == "late" and not outcome.is_failure
    assert outcome.failure == "no answer within 20 ms (the shortened deadline; the controller's own is 2000 ms)"
    tamiyo.release.set()
    shake.close()


def test_an_answer_carries_its_latency_and_is_no_fallback(perf_counter: list[float]) -> None:
    cmd = _command()
    shake = TamiyoHandshake(Tamiyo(cmd), timeout_s=1.0, clock=lambda: NOW)
    outcome = shake.exchange(_packet())
    assert outcome.command is cmd and outcome.fallback is False and outcome.failure_kind == ""
    assert outcome.latency_ms == 250.0
    shake.close()


def test_a_fallback_is_a_noop_from_tolaria_that_says_why_and_how_long(perf_counter: list[float]) -> None:
    shake = TamiyoHandshake(Tamiyo(error=RuntimeError("policy exploded")), timeout_s=1.0, clock=lambda: NOW)
    outcome = shake.exchange(_packet())
    expected = noop_command(issued_by="tolaria", reason="fallback: tamiyo error: RuntimeError: policy exploded")
    assert is_noop(outcome.command) and outcome.command.issued_by == expected.issued_by == "tolaria"
    assert outcome.command.annotations["reason"] == expected.annotations["reason"]
    assert outcome.command.annotations["fallback"] == "error"
    assert outcome.latency_ms == 250.0
    shake.close()


def test_only_a_seed_germinate_is_a_germination() -> None:
    assert is_germination(_command())
    assert not is_germination(seed_command(SEED_OP_CULL, issued_by="tamiyo", target_seed_id="seed-1"))
    assert not is_germination(noop_command(issued_by="tamiyo", reason="nothing"))


def test_the_caller_refuses_after_four_hung_calls_by_default_and_names_its_workers() -> None:
    release = threading.Event()
    caller = DeadlineCaller()
    for _ in range(4):
        with pytest.raises(handshake.HandshakeError, match="no answer within 10 ms"):
            caller.call(lambda _: release.wait(30), None, 0.01)
    workers = [t for t in threading.enumerate() if t.name == "tamiyo-call"]
    assert len(workers) >= 5 and all(t.daemon for t in workers)  # four hung, one fresh: none blocks exit
    with pytest.raises(handshake.HandshakeError) as info:
        caller.call(lambda _: None, None, 1.0)
    assert (info.value.kind, str(info.value)) == ("refused", "4 calls are still hung; refusing new calls")
    release.set()
    caller.close()


def test_each_late_return_counts_one_back() -> None:
    releases = [threading.Event(), threading.Event()]
    caller = DeadlineCaller()
    for release in releases:
        with pytest.raises(handshake.HandshakeError):
            caller.call(lambda r: r.wait(30), release, 0.01)
    assert (caller.abandoned, caller.returned_late) == (2, 0)
    for n, release in enumerate(releases, start=1):
        release.set()
        for _ in range(500):
            if caller.returned_late == n:
                break
            threading.Event().wait(0.01)
        assert (caller.abandoned, caller.returned_late) == (2 - n, n)
    caller.close()


def test_the_timeout_message_gives_the_deadline_in_milliseconds() -> None:
    release = threading.Event()
    caller = DeadlineCaller()
    with pytest.raises(handshake.HandshakeError, match="^no answer within 600 ms$"):
        caller.call(lambda _: release.wait(30), None, 0.6)
    release.set()
    caller.close()
