"""A response that succeeds after its deadline is recorded as late, never escalated into a second,
heavier one: only failures escalate (a deadline bounds a hang, not a success)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from test_safety import CALM  # type: ignore[import-not-found]
from trainer_fixtures import small_config  # type: ignore[import-not-found]

from esper.tolaria.drills import FaultPlan


def _trainer(make_trainer: Any, tmp_path: Path, drill: str) -> tuple[Any, Any]:
    cfg = {**CALM, "run": {"epochs": 4}, "checkpoint": {"enabled": True},
           "emergency": {"spike_lr_factor": 1.0, "watchdog_s": 30.0}}
    return make_trainer(small_config(**cfg), faults=FaultPlan.parse([drill]), run_dir=tmp_path)


def _slow_once(obj: Any, name: str, seconds: float) -> None:
    original, calls = getattr(obj, name), []

    def slow(*args: Any, **kwargs: Any) -> Any:
        if not calls:
            calls.append(1)
            time.sleep(seconds)
        return original(*args, **kwargs)

    setattr(obj, name, slow)


def test_a_fast_rollback_that_succeeds_in_600_ms_runs_no_full_rollback(make_trainer: Any, tmp_path: Path) -> None:
    trainer, bus = _trainer(make_trainer, tmp_path, "nan-loss@epoch=3,step=1")
    _slow_once(trainer.safety.coordinator.participants[1], "prepare", 0.6)  # over SEVERE's 500 ms
    s = trainer.fit().summary
    chain = [(e["level"], e["ok"], e["escalated_to"], e["late"]) for e in s["emergencies"]]
    assert chain == [("severe", True, "", True)], chain
    assert [r["tier"] for r in s["rollbacks"]] == ["fast"]
    assert "late: prepare took" in s["emergencies"][0]["detail"]
    assert "emergency_late" in bus.events() and s["epochs_completed"] == 4


def test_a_full_rollback_waiting_on_a_slow_checkpoint_flush_does_not_halt(make_trainer: Any, tmp_path: Path) -> None:
    trainer, bus = _trainer(make_trainer, tmp_path, "nan-loss@epoch=3,step=1")
    trainer.safety.snapshots.cache.last_healthy = lambda before_step=None: None  # no fast tier: SEVERE fails to MAJOR
    _slow_once(trainer.checkpoints.store, "flush", 2.1)  # over MAJOR's 2 s
    s = trainer.fit().summary
    chain = [(e["level"], e["ok"], e["escalated_to"], e["late"]) for e in s["emergencies"]]
    assert chain == [("severe", False, "major", False), ("major", True, "", True)], chain
    assert not s.get("stopped") and s["epochs_completed"] == 4
    assert "emergency_late" in bus.events()
