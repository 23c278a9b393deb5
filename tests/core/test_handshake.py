"""The Tamiyo handshake returns at its deadline whatever the controller does."""

from __future__ import annotations

import threading
import time

import pytest

from esper.leyline import (
    COMMAND_SEED,
    SEED_OP_GERMINATE,
    AdaptationCommand,
    SystemStatePacket,
    is_noop,
    seed_command,
    system_state_packet,
)
from esper.tolaria.loop.handshake import DeadlineCaller, HandshakeError, TamiyoHandshake


def packet() -> SystemStatePacket:
    return system_state_packet(epoch=1, global_step=10, training_loss=1.0, validation_loss=1.0,
                               validation_accuracy=0.5)


class Controller:
    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.release = threading.Event()

    def evaluate_epoch(self, p: SystemStatePacket) -> AdaptationCommand:
        if self.behaviour == "hang":
            self.release.wait(30)
        if self.behaviour == "slow":
            time.sleep(0.3)
        if self.behaviour == "raise":
            raise RuntimeError("policy exploded")
        if self.behaviour == "garbage":
            return "not a command"  # type: ignore[return-value]
        if self.behaviour == "unknown-type":
            return AdaptationCommand(version=1, command_id="x", command_type=42)  # type: ignore[arg-type]
        return seed_command(SEED_OP_GERMINATE, issued_by="tamiyo", target_seed_id="stem", blueprint_id="residual_mlp")


def test_a_hung_controller_returns_the_fallback_at_the_deadline() -> None:
    ctrl = Controller("hang")
    hs = TamiyoHandshake(ctrl, timeout_s=0.1)
    started = time.perf_counter()
    outcome = hs.exchange(packet())
    elapsed = time.perf_counter() - started
    ctrl.release.set()
    assert outcome.fallback and outcome.failure_kind == "timeout"
    assert is_noop(outcome.command) and outcome.command.annotations["fallback"] == "timeout"
    assert elapsed < 0.6, f"the deadline of 0.1 s bounded nothing: {elapsed:.3f} s"


def test_after_a_hang_the_next_call_gets_a_fresh_worker() -> None:
    ctrl = Controller("hang")
    hs = TamiyoHandshake(ctrl, timeout_s=0.05)
    assert hs.exchange(packet()).fallback
    ctrl.behaviour = "ok"
    outcome = hs.exchange(packet())
    ctrl.release.set()
    assert not outcome.fallback and outcome.command.command_type == COMMAND_SEED


@pytest.mark.parametrize(("behaviour", "kind", "text"), [
    ("raise", "error", "RuntimeError: policy exploded"),
    ("garbage", "invalid", "returned str, not an AdaptationCommand"),
    ("unknown-type", "invalid", "not a known CommandType"),
    ("slow", "timeout", "no answer within 100 ms"),
])
def test_bad_answers_fall_back_with_the_reason(behaviour: str, kind: str, text: str) -> None:
    outcome = TamiyoHandshake(Controller(behaviour), timeout_s=0.1).exchange(packet())
    assert outcome.fallback and outcome.failure_kind == kind
    assert text in outcome.failure


def test_an_expired_command_is_refused() -> None:
    hs = TamiyoHandshake(Controller("ok"), timeout_s=1.0, command_max_age_s=60, clock=lambda: time.time() + 120)
    outcome = hs.exchange(packet())
    assert outcome.fallback and outcome.failure_kind == "expired"


def test_a_verifier_rejection_falls_back() -> None:
    def verifier(cmd: AdaptationCommand) -> None:
        raise ValueError("forged: signature mismatch")

    outcome = TamiyoHandshake(Controller("ok"), timeout_s=1.0, verifier=verifier).exchange(packet())
    assert outcome.fallback and outcome.failure_kind == "rejected" and "forged" in outcome.failure


def test_too_many_hung_calls_are_refused_without_waiting() -> None:
    release = threading.Event()
    caller = DeadlineCaller(max_abandoned=2)
    for _ in range(2):
        with pytest.raises(HandshakeError):
            caller.call(lambda _: release.wait(30), None, 0.02)
    started = time.perf_counter()
    with pytest.raises(HandshakeError, match="2 calls are still hung"):
        caller.call(lambda _: 1, None, 5.0)
    assert time.perf_counter() - started < 0.5
    release.set()
