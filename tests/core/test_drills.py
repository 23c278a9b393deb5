"""Each fault drill fires at its epoch and its outcome lands in the summary."""

from __future__ import annotations

from typing import Any

from trainer_fixtures import small_config  # type: ignore[import-not-found]

from esper.tolaria.drills import FaultPlan


def run_drill(make_trainer: Any, spec: str, epochs: int = 4, **config: Any) -> dict[str, Any]:
    trainer, bus = make_trainer(small_config(run={"epochs": epochs}, **config), faults=FaultPlan.parse([spec]))
    summary = trainer.fit().summary
    summary["_events"] = bus.events()
    return summary


def test_tamiyo_hang_drill_falls_back_at_the_deadline(make_trainer: Any) -> None:
    s = run_drill(make_trainer, "tamiyo-hang@epoch=1", handshake={"tamiyo_timeout_s": 0.1})
    assert s["drills"][0]["fired"] and s["tamiyo_fallbacks"][0] == {
        "epoch": 1, "kind": "timeout", "reason": "no answer within 100 ms"}


def test_tamiyo_garbage_drill_is_rejected_as_invalid(make_trainer: Any) -> None:
    s = run_drill(make_trainer, "tamiyo-garbage@epoch=2")
    assert [f["kind"] for f in s["tamiyo_fallbacks"]] == ["invalid"]


def test_forged_command_drill_is_rejected_by_signature_verification(make_trainer: Any) -> None:
    s = run_drill(make_trainer, "tamiyo-forged-command@epoch=1")
    fallback = s["tamiyo_fallbacks"][0]
    assert fallback["kind"] == "rejected" and "forged" in fallback["reason"]
    assert s["epochs_completed"] == 4


def test_lr_tamper_drill_is_detected_within_one_step_and_reverted(make_trainer: Any) -> None:
    s = run_drill(make_trainer, "lr-tamper@epoch=1")
    drill = s["drills"][0]
    assert drill["fired"] and drill["outcome"].startswith("detected at step")
    assert s["breakers"]["lr_controller"]["failures"] == 1
    assert "lr_out_of_band_write" in s["_events"]


def test_redis_down_drill_counts_failures_and_training_goes_on(make_trainer: Any) -> None:
    s = run_drill(make_trainer, "redis-down@epoch=1")
    assert s["epochs_completed"] == 4
    assert s["telemetry"]["publish_failures"] > 0 and "redis-down" in s["telemetry"]["last_error"]
    assert s["drills"][0]["fired"]
