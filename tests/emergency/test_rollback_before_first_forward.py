"""A fast rollback to a snapshot taken before the model's first forward: a user model's Kasmina
learns its slots' shapes at that forward, so the birth snapshot lacks them. The rollback must still
be fast and confirmed (shapes are observations Kasmina keeps), not fail and escalate to a restore
from disk. Found on the CNN and the transformer LM examples, whose models come from a factory."""

from __future__ import annotations

from typing import Any

import pytest

from esper.tolaria.config import config_from_dict
from esper.tolaria.drills import FaultPlan
from esper.tolaria.loop.build import build_trainer


def _factory_job(**run: Any) -> Any:
    return config_from_dict({
        "run": {"name": "cnn", "epochs": 2, "seed": 0, "threads": 1, **run},
        "data": {"factory": "esper.tolaria.zoo:digits_images", "batch_size": 64},
        "model": {"factory": "esper.tolaria.zoo:digits_cnn", "slots": ["conv1.2", "fc.1"],
                  "kwargs": {"channels": [2, 4], "hidden": 8, "dropout": 0.2}},
        "checkpoint": {"enabled": False}, "telemetry": {"jsonl": False}, "emergency": {"broadcast": False},
    })


@pytest.mark.parametrize("readback", ["sync", "deferred"])
def test_a_nan_in_the_first_epochs_rolls_back_fast_to_the_birth_snapshot(readback: str) -> None:
    trainer = build_trainer(_factory_job(loss_readback=readback),
                            faults=FaultPlan.parse(["nan-loss@epoch=1,step=3"]))
    assert not trainer.kasmina.manifest()["shapes"], "the factory model's shapes must be unknown at birth"
    summary = trainer.fit().summary
    [rollback] = summary["rollbacks"]
    assert rollback["tier"] == "fast" and rollback["succeeded"], rollback
    assert [e["level"] for e in summary["emergencies"]] == ["severe"]
