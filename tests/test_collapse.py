"""Collapse detection: validation loss back near chance after it was well below it is MAJOR and rolls back."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from trainer_fixtures import MemoryBus, small_config  # type: ignore[import-not-found]

from esper.tolaria.loop.build import build_trainer
from esper.tolaria.recovery.emergency import MAJOR
from esper.tolaria.recovery.monitors import CollapseMonitor

CHANCE = math.log(10)


def _judge(monitor: CollapseMonitor, loss: float, chance: float | None = CHANCE) -> Any:
    monitor.note(loss, chance)
    return monitor.observe(epoch=0, step=0)


def test_a_loss_back_near_chance_after_it_was_well_below_is_major() -> None:
    monitor = CollapseMonitor(fraction=0.9, below=0.5)
    assert _judge(monitor, 0.95 * CHANCE) is None  # near chance from the start: untrained, not collapsed
    assert _judge(monitor, 0.3 * CHANCE) is None
    incident = _judge(monitor, 0.92 * CHANCE)
    assert incident is not None and incident.level == MAJOR and incident.kind == "loss_collapse"
    assert "back near chance" in incident.reason
    assert _judge(monitor, float("nan")).kind == "loss_collapse"
    assert _judge(monitor, 0.6 * CHANCE) is None  # worse, but not near chance


def test_a_loss_that_never_went_well_below_chance_is_not_a_collapse() -> None:
    monitor = CollapseMonitor(fraction=0.9, below=0.5)
    for ratio in (0.95, 0.7, 0.6, 0.95):
        assert _judge(monitor, ratio * CHANCE) is None
    assert _judge(CollapseMonitor(), 0.1, chance=None) is None  # no chance loss (regression): never judged
    restored = CollapseMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.best_ratio == monitor.best_ratio


class _WreckAt:
    """Zeroes the output layer before one boundary's validation: logits 0, loss exactly ln(10)."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.fired = epoch, False

    def on_boundary_begin(self, trainer: Any, epoch: int) -> None:
        if epoch == self.epoch and not self.fired:
            self.fired = True
            last = [m for n, m in trainer.model.named_modules()
                    if isinstance(m, torch.nn.Linear) and not n.startswith("kasmina_seeds")][-1]  # the host's head
            with torch.no_grad():
                last.weight.zero_()
                last.bias.zero_()


def test_a_collapse_in_a_run_is_rolled_back_to_the_state_before_it(tmp_path: Path) -> None:
    config = small_config(run={"epochs": 5, "morphogenesis": False}, emergency={"accuracy_drop": 1.0},
                          model={"hidden": [32]}, optimizer={"lr": 0.05}, checkpoint={"enabled": True})
    trainer = build_trainer(config, bus=MemoryBus(), callbacks=(_WreckAt(3),), run_dir=tmp_path)
    result = trainer.fit()
    rollbacks = result.summary["rollbacks"]
    assert len(rollbacks) == 1 and "loss_collapse" in rollbacks[0]["reason"]
    assert result.epochs_completed == 5
    assert result.final_val_loss < 0.5 * CHANCE  # training went on from the healthy state


class _Recording:
    """Tamiyo, keeping every packet it is shown (its state is the inner controller's)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.packets = inner, []

    def evaluate_epoch(self, packet: Any) -> Any:
        self.packets.append(packet)
        return self.inner.evaluate_epoch(packet)

    def state_dict(self) -> Any:
        return self.inner.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.inner.load_state_dict(state)


def test_a_mutation_undone_by_a_collapse_rollback_is_reported_to_tamiyo_in_the_next_packet(tmp_path: Path) -> None:
    from trainer_fixtures import FAST_GROWTH  # type: ignore[import-not-found]

    from esper.leyline import SEED_OP_GERMINATE, SEED_OP_START_TRAINING
    from esper.tamiyo import HeuristicTamiyo, TamiyoConfig

    config = small_config(run={"epochs": 5}, emergency={"accuracy_drop": 1.0}, model={"hidden": [32]},
                          optimizer={"lr": 0.05}, checkpoint={"enabled": True})
    tamiyo = _Recording(HeuristicTamiyo(TamiyoConfig(**{**FAST_GROWTH["tamiyo"], "cooldown_epochs": 2})))
    trainer = build_trainer(config, bus=MemoryBus(), callbacks=(_WreckAt(2),), run_dir=tmp_path, tamiyo=tamiyo)
    result = trainer.fit()
    assert [r["reason"].split(":")[0] for r in result.summary["rollbacks"]] == ["major loss_collapse"]
    # Boundary 1 germinated seed1 in the stem; boundary 2 validated the wrecked model and started seed1's
    # training, then its monitors saw the collapse and went back to before boundary 1's command (boundary
    # 0's checkpoint), undoing both.
    reported = [p for p in tamiyo.packets if p.rolled_back_commands]
    assert [p.current_epoch for p in reported] == [1]  # the boundary the rollback returned to, asked again
    undone = reported[0].rolled_back_commands
    assert [(u.operation, u.target_seed_id, u.applied_epoch) for u in undone] == [
        (SEED_OP_GERMINATE, "stem", 1), (SEED_OP_START_TRAINING, "seed1", 2)]
    assert all("loss_collapse" in u.reason and u.incident_kind == "loss_collapse" for u in undone)


def test_a_collapse_restores_the_state_from_before_the_previous_boundary_s_widening(tmp_path: Path) -> None:
    config = small_config(run={"epochs": 4}, emergency={"accuracy_drop": 1.0}, model={"hidden": [16, 8]},
                          optimizer={"lr": 0.05}, checkpoint={"enabled": True},
                          kasmina={"widen": [["body.2", "head"]], "widen_units": 4},
                          tamiyo={"growth": "widen", "widen_layers": ["body.2"]},
                          boundary={"total_ms": 1e5, "apply_ms": 1e4, "check_ms": 1e4, "state_assembly_ms": 1e4,
                                    "tamiyo_ms": 1e4})
    trainer = build_trainer(config, bus=MemoryBus(), callbacks=(_WreckAt(2),), run_dir=tmp_path)
    history = trainer.fit().summary
    # Boundary 1 widened body.2 and boundary 2 is the first validation to see it: the widened state of
    # boundary 1's checkpoint is not where the collapse can be undone; boundary 0's is.
    (rollback,) = history["rollbacks"]
    assert "loss_collapse" in rollback["reason"] and rollback["target_epoch"] == 1
    epochs = [e["epoch"] for e in history["history"]]
    assert epochs == [0, 1, 2, 3]  # epoch 1 trained again from boundary 0's state
