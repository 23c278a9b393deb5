"""Late Tamiyo answers cost one epoch's command each, never the controller for the rest of the run."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from trainer_fixtures import small_config  # type: ignore[import-not-found]

from esper.leyline import AdaptationCommand, SystemStatePacket, system_state_packet
from esper.tamiyo import HeuristicTamiyo
from esper.tolaria.loop.handshake import DeadlineCaller, HandshakeError, TamiyoHandshake


class PacedTamiyo:
    """Answers after `delays[epoch]` seconds (0 when absent), then defers to the heuristic."""

    def __init__(self, delays: dict[int, float], default_s: float = 0.0, raise_at: tuple[int, ...] = ()) -> None:
        self.delays, self.default_s, self.raise_at = delays, default_s, raise_at
        self.inner = HeuristicTamiyo()
        self.asked: list[int] = []

    def evaluate_epoch(self, packet: SystemStatePacket) -> AdaptationCommand:
        self.asked.append(packet.current_epoch)
        if packet.current_epoch in self.raise_at:
            raise RuntimeError("controller crashed")
        time.sleep(self.delays.get(packet.current_epoch, self.default_s))
        return self.inner.evaluate_epoch(packet)


def fit(make_trainer: Any, tamiyo: Any, epochs: int, healthy_epochs_to_exit: int = 2) -> dict[str, Any]:
    cfg = small_config(run={"epochs": epochs}, handshake={"tamiyo_timeout_s": 0.2, "max_abandoned_workers": 4},
                       breakers={"failure_threshold": 3, "cooldown_calls": 1},
                       conservative={"healthy_epochs_to_exit": healthy_epochs_to_exit,
                                     "tamiyo_timeout_factor": 0.5},
                       # budgets that a slow Tamiyo does not breach: only the handshake is under test
                       boundary={"tamiyo_ms": 5000.0, "total_ms": 5000.0})
    trainer, _ = make_trainer(cfg, tamiyo=tamiyo)
    return dict(trainer.fit().summary)


def test_a_worker_that_finishes_late_is_counted_back() -> None:
    caller = DeadlineCaller(max_abandoned=2)
    for _ in range(2):
        try:
            caller.call(lambda _: time.sleep(0.05), None, 0.01)
        except HandshakeError as exc:
            assert exc.kind == "timeout"
    deadline = time.monotonic() + 2
    while caller.abandoned and time.monotonic() < deadline:
        time.sleep(0.01)
    assert caller.abandoned == 0
    assert caller.call(lambda x: x + 1, 1, 1.0) == 2


def test_a_still_hung_worker_keeps_counting() -> None:
    release = threading.Event()
    caller = DeadlineCaller(max_abandoned=4)
    try:
        caller.call(lambda _: release.wait(30), None, 0.01)
    except HandshakeError:
        pass
    time.sleep(0.05)
    assert caller.abandoned == 1
    release.set()


def test_missing_only_a_shortened_deadline_is_late_not_a_failure() -> None:
    hs = TamiyoHandshake(PacedTamiyo({}, default_s=0.08), timeout_s=0.5)
    late = hs.exchange(_packet(), timeout_s=0.02)
    assert late.fallback and late.failure_kind == "late" and not late.is_failure
    assert "the controller's own is 500 ms" in late.failure
    timed_out = TamiyoHandshake(PacedTamiyo({}, default_s=0.08), timeout_s=0.02).exchange(_packet())
    assert timed_out.failure_kind == "timeout" and timed_out.is_failure


def _packet() -> SystemStatePacket:
    return system_state_packet(epoch=1, global_step=10, training_loss=1.0, validation_loss=1.0,
                               validation_accuracy=0.5)


def test_a_tamiyo_late_many_times_then_prompt_keeps_being_consulted(make_trainer: Any) -> None:
    # Late at epochs 0-5 (more than max_abandoned_workers), prompt afterwards.
    tamiyo = PacedTamiyo({e: 0.3 for e in range(6)})
    summary = fit(make_trainer, tamiyo, epochs=14)
    kinds = [f["kind"] for f in summary["tamiyo_fallbacks"]]
    assert "refused" not in kinds, kinds
    late = [f["epoch"] for f in summary["tamiyo_fallbacks"]]
    assert max(late) < 10, f"a prompt Tamiyo still falls back late in the run: {summary['tamiyo_fallbacks']}"
    assert summary["breakers"]["tamiyo"]["state"] == "CLOSED"
    assert not summary["conservative_mode"]["active"]


@pytest.mark.parametrize("healthy_epochs_to_exit", [2, 4])
def test_conservative_mode_exits_with_a_tamiyo_slower_than_its_shorter_deadline(
        make_trainer: Any, healthy_epochs_to_exit: int) -> None:
    # Three crashes open the breaker (conservative mode); afterwards every answer takes 0.14 s:
    # over the conservative deadline (0.1 s), within the normal one (0.2 s). With 4 healthy
    # epochs to exit, more than the breaker's threshold of 3 would fit in the streak.
    tamiyo = PacedTamiyo({}, default_s=0.14, raise_at=(0, 1, 2))
    summary = fit(make_trainer, tamiyo, epochs=12, healthy_epochs_to_exit=healthy_epochs_to_exit)
    cons = summary["conservative_mode"]
    assert cons["entered"] >= 1
    assert cons["exited"] >= 1 and not cons["active"], (cons, summary["tamiyo_fallbacks"])
    assert summary["breakers"]["tamiyo"]["state"] == "CLOSED"
