"""Early stopping: the run stops at the epoch the rule names, says why, and decides from the run's
history alone (so a resumed run decides as the uninterrupted one)."""

from __future__ import annotations

from typing import Any

import pytest
from trainer_fixtures import small_config  # type: ignore[import-not-found]

from esper.tolaria.config import EarlyStoppingConfig
from esper.tolaria.loop.early_stopping import EarlyStopping
from esper.tolaria.tasks import ClassificationTask, RegressionTask

CALM = {"boundary": {"state_assembly_ms": 1e4, "tamiyo_ms": 1e4, "apply_ms": 1e4, "check_ms": 1e4,
                     "total_ms": 1e5}, "handshake": {"tamiyo_timeout_s": 30.0}}


def rule(**options: Any) -> EarlyStopping:
    return EarlyStopping(EarlyStoppingConfig(**options), ClassificationTask())


def test_it_stops_once_patience_epochs_passed_without_an_improvement_above_min_delta() -> None:
    stop = rule(patience=2, min_delta=0.01)
    epochs = list(range(6))
    assert stop.reason([0.5, 0.6, 0.605], epochs) is None, "one epoch of waiting so far"
    why = stop.reason([0.5, 0.6, 0.605, 0.609], epochs)
    assert why is not None and "best 0.6000 at epoch 1" in why and "for 2 epochs" in why
    assert stop.reason([0.5, 0.6, 0.605, 0.62], epochs) is None, "0.62 beats 0.6 by more than 0.01"
    assert rule(patience=0).reason([0.9, 0.1, 0.1, 0.1], epochs) is None, "patience 0: never"


def test_a_loss_is_better_lower_and_an_unknown_direction_is_refused_before_training() -> None:
    stop = rule(patience=1, metric="loss")
    assert stop.reason([1.0, 0.8], [0, 1]) is None and stop.reason([1.0, 0.8, 0.9], [0, 1, 2]) is not None
    assert EarlyStopping(EarlyStoppingConfig(patience=1), RegressionTask()).higher is True  # r2: higher is better
    with pytest.raises(ValueError, match="set early_stopping.mode to 'max' or 'min'"):
        rule(patience=1, metric="token_accuracy")


def test_a_run_stops_early_and_says_why(make_trainer: Any) -> None:
    # A rule no epoch can satisfy (the loss watched as if higher were better): it stops after patience epochs.
    cfg = small_config(**CALM, run={"epochs": 8}, early_stopping={"patience": 2, "metric": "loss", "mode": "max"})
    trainer, _ = make_trainer(cfg)
    s = trainer.fit().summary
    assert s["epochs_completed"] == 3 and s["stopped"].startswith("early stopping: validation loss")
    assert "at epoch 0" in s["stopped"]
