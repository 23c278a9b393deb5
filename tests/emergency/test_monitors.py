"""Each fault maps to its level: NaN loss, NaN grad, x20 spike, accuracy collapse, hung step, slow boundary."""

from __future__ import annotations

import math
import threading

import pytest

from esper.leyline import (
    EMERGENCY_LEVEL_CONSERVATIVE,
    EMERGENCY_LEVEL_ELEVATED,
    EMERGENCY_LEVEL_HALT,
    EMERGENCY_LEVEL_NOTICE,
)
from esper.tolaria.recovery.emergency import Incident
from esper.tolaria.recovery.monitors import AccuracyMonitor, GradientMonitor, LossMonitor, TimingMonitor, Watchdog


def _warm(monitor: LossMonitor, steps: int = 30, loss: float = 1.0) -> None:
    for s in range(steps):
        assert monitor.observe(loss, epoch=0, step=s) is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_loss_is_severe(bad: float) -> None:
    incident = LossMonitor().observe(bad, epoch=1, step=7)
    assert incident is not None and incident.level == EMERGENCY_LEVEL_CONSERVATIVE
    assert incident.kind == "loss_nonfinite" and (incident.epoch, incident.step) == (1, 7)


def test_a_20x_loss_spike_is_severe_and_does_not_move_the_baseline() -> None:
    monitor = LossMonitor(spike_factor=15.0, warmup_steps=10)
    _warm(monitor)
    incident = monitor.observe(20.0, epoch=0, step=31)
    assert incident is not None and incident.level == EMERGENCY_LEVEL_CONSERVATIVE and incident.kind == "loss_spike"
    assert monitor.baseline == pytest.approx(1.0)
    assert monitor.observe(10.0, epoch=0, step=32) is None  # 10x is under the 15x limit


def test_no_spike_is_judged_during_warmup() -> None:
    monitor = LossMonitor(warmup_steps=5)
    assert monitor.observe(1.0, 0, 0) is None
    assert monitor.observe(50.0, 0, 1) is None


def test_loss_monitor_state_round_trips() -> None:
    monitor = LossMonitor(warmup_steps=3)
    _warm(monitor, 5, 2.0)
    restored = LossMonitor(warmup_steps=3)
    restored.load_state_dict(monitor.state_dict())
    incident = restored.observe(40.0, 0, 6)
    assert incident is not None and incident.kind == "loss_spike"


@pytest.mark.parametrize(("finite", "norm"), [(False, 1.0), (True, math.nan), (True, math.inf)])
def test_nonfinite_gradients_are_severe(finite: bool, norm: float) -> None:
    monitor = GradientMonitor()
    assert monitor.observe(True, 3.0, 0, 0) is None
    incident = monitor.observe(finite, norm, 0, 1)
    assert incident is not None and incident.level == EMERGENCY_LEVEL_CONSERVATIVE and incident.kind == "grad_nonfinite"
    assert monitor.state_dict() == {"nonfinite_total": 1}


def test_accuracy_collapse_is_major_and_keeps_the_best() -> None:
    monitor = AccuracyMonitor(max_drop=0.25)
    for epoch, acc in enumerate([0.5, 0.8, 0.7]):
        assert monitor.observe(acc, epoch, epoch * 100) is None
    incident = monitor.observe(0.3, 3, 300)
    assert incident is not None and incident.level == EMERGENCY_LEVEL_ELEVATED and incident.kind == "accuracy_collapse"
    assert monitor.best == 0.8
    nan = monitor.observe(math.nan, 4, 400)
    assert nan is not None and nan.level == EMERGENCY_LEVEL_ELEVATED


def test_accuracy_below_floor_after_reaching_it_is_major() -> None:
    monitor = AccuracyMonitor(max_drop=0.9, floor=0.5)
    assert monitor.observe(0.3, 0, 0) is None  # never reached the floor yet: not a collapse
    assert monitor.observe(0.6, 1, 1) is None
    incident = monitor.observe(0.45, 2, 2)
    assert incident is not None and incident.kind == "accuracy_floor" and incident.level == EMERGENCY_LEVEL_ELEVATED


def test_boundary_over_budget_three_times_in_a_row_is_minor() -> None:
    monitor = TimingMonitor(budget_ms=18.0, consecutive=3)
    assert monitor.observe(30.0, 0, 0) is None
    assert monitor.observe(5.0, 1, 1) is None  # a good boundary breaks the streak
    assert monitor.observe(30.0, 2, 2) is None
    assert monitor.observe(30.0, 3, 3) is None
    incident = monitor.observe(30.0, 4, 4)
    assert incident is not None and incident.level == EMERGENCY_LEVEL_NOTICE and incident.kind == "boundary_over_budget"
    assert monitor.state_dict() == {"streak": 0, "over_total": 4}


def test_watchdog_fires_critical_once_for_a_hung_step_from_its_thread() -> None:
    fired: list[tuple[Incident, str]] = []
    event = threading.Event()

    def on_timeout(incident: Incident) -> None:
        fired.append((incident, threading.current_thread().name))
        event.set()

    dog = Watchdog(deadline_s=0.05, on_timeout=on_timeout, poll_s=0.005).start()
    try:
        dog.heartbeat(epoch=2, step=41)
        assert event.wait(timeout=5)
        event.clear()
        assert not event.wait(timeout=0.15)  # one stall, one incident
    finally:
        dog.stop()
    incident, thread = fired[0]
    assert len(fired) == 1 and thread == "tolaria-watchdog"
    assert incident.level == EMERGENCY_LEVEL_HALT and incident.kind == "step_hung" and incident.step == 41


def test_watchdog_stays_quiet_while_heartbeats_arrive_or_paused() -> None:
    fired: list[Incident] = []
    dog = Watchdog(deadline_s=0.2, on_timeout=fired.append, poll_s=0.005).start()
    try:
        for step in range(30):
            dog.heartbeat(0, step)
            threading.Event().wait(0.005)
        dog.pause()
        threading.Event().wait(0.3)
        dog.resume()
    finally:
        dog.stop()
    assert fired == [] and dog.fired_total == 0


def test_monitors_reject_nonsense_settings_with_the_fix() -> None:
    with pytest.raises(ValueError, match="must exceed 1"):
        LossMonitor(spike_factor=0.5)
    with pytest.raises(ValueError, match="absolute drop"):
        AccuracyMonitor(max_drop=5)
