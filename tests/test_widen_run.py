"""A run that grows by widening a host layer (Net2Net): it trains on, resumes exactly, and rolls back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer_fixtures import MemoryBus, small_config  # type: ignore[import-not-found]

from esper.tolaria.config import TolariaConfig
from esper.tolaria.loop.build import build_trainer

CALM = {"state_assembly_ms": 1e4, "tamiyo_ms": 1e4, "apply_ms": 1e4, "check_ms": 1e4, "total_ms": 1e5}


def _config(**sections: dict[str, Any]) -> TolariaConfig:
    return small_config(**{"run": {"epochs": 5}, "model": {"hidden": [16, 8]}, "boundary": CALM,
                           "kasmina": {"widen": [["body.2", "head"]], "widen_units": 4},
                           "tamiyo": {"growth": "widen", "widen_layers": ["body.2"], "cooldown_epochs": 1},
                           **sections})


class StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, t: Any, step: int, loss: Any) -> None:
        if step == self.step:
            t.request_stop("test")


def test_a_widening_run_grows_the_host_layer_and_resumes_into_the_same_state(tmp_path: Path) -> None:
    reference = build_trainer(_config(), bus=MemoryBus())
    host = reference.param_count()
    result = reference.fit()
    widened = [h["command"] for h in result.summary["history"] if h["command"].startswith("widen body.2")]
    assert len(widened) >= 2 and not result.summary["seeds"]
    assert reference.model.body[2].out_features == 8 + 4 * len(widened)  # type: ignore[index,union-attr]
    assert result.summary["param_count"] == host + len(widened) * 4 * (16 + 1 + 10)

    config = _config(checkpoint={"enabled": True})
    stopped = build_trainer(config, run_dir=tmp_path, callbacks=(StopAt(75),), bus=MemoryBus())
    assert stopped.fit().summary["stopped"] == "test"
    resumed = build_trainer(config, run_dir=tmp_path, bus=MemoryBus())
    resumed.resume_from(tmp_path / "checkpoints")  # a fresh (narrow) host, widened from the manifest
    resumed.fit()
    assert resumed.final_state_sha256() == reference.final_state_sha256()


def test_a_rollback_across_a_widening_narrows_the_host_and_training_goes_on(tmp_path: Path) -> None:
    config = _config(checkpoint={"enabled": True}, emergency={"broadcast": False})
    faults = ["nan-loss@epoch=3,step=2"]
    from esper.tolaria.drills import FaultPlan

    trainer = build_trainer(config, run_dir=tmp_path, faults=FaultPlan.parse(faults), bus=MemoryBus())
    result = trainer.fit()
    (rollback,) = result.summary["rollbacks"]
    assert rollback["target_epoch"] == 2 and result.epochs_completed == 5  # before boundary 2's widening
    widened = [h for h in result.summary["history"] if h["command"].startswith("widen body.2")]
    assert trainer.model.body[2].out_features == 8 + 4 * len(widened)  # type: ignore[index,union-attr]
    assert result.final_val_accuracy > 0.5
