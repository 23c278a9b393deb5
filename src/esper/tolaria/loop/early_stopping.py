"""Early stopping (`[early_stopping]`): a trainer callback that stops the run once the watched
validation metric has not improved for `patience` epochs.

It keeps no state of its own: every boundary it reads the run's history (`trainer.log.epochs`),
which snapshots and checkpoints carry and rollbacks rewind. So a resumed or rolled-back run decides
exactly as the uninterrupted one would, with nothing to save.
"""

from __future__ import annotations

import math
from typing import Any

from esper.tolaria.config import EarlyStoppingConfig

STOP_PREFIX = "early stopping"
KEY = "early_stopping"  # the config section its messages name


class EarlyStopping:
    """The callback; built with the run's task, so a metric without a known direction fails before training."""

    def __init__(self, config: EarlyStoppingConfig, task: Any) -> None:
        self.config = config
        self.metric = config.metric or task.primary_metric
        self.higher = higher_is_better(config.mode, self.metric, task, key=KEY)

    def on_boundary_end(self, trainer: Any, epoch: int, report: Any) -> None:
        values = [metric_value(rec, self.metric, key=KEY) for rec in trainer.log.epochs]
        reason = self.reason(values, [rec.epoch for rec in trainer.log.epochs])
        if reason is not None:
            trainer.request_stop(reason)

    def reason(self, values: list[float], epochs: list[int]) -> str | None:
        """Why to stop after these epochs' values, or None: no improvement of more than `min_delta`
        over the best so far in the last `patience` epochs."""
        patience, delta = self.config.patience, self.config.min_delta
        if patience == 0 or len(values) <= patience:
            return None
        metric, sign = self.metric, 1.0 if self.higher else -1.0
        best_at = 0
        for i, value in enumerate(values):
            if math.isfinite(value) and (not math.isfinite(values[best_at]) or
                                         sign * (value - values[best_at]) > delta):
                best_at = i
        waited = len(values) - 1 - best_at
        if waited < patience:
            return None
        return (f"{STOP_PREFIX}: validation {metric} has not improved by more than {delta:g} for {waited} epochs "
                f"(best {values[best_at]:.4f} at epoch {epochs[best_at]})")


def higher_is_better(mode: str, metric: str, task: Any, *, key: str) -> bool:
    """Whether a larger `metric` is better under `mode` (auto: known for the task's primary metric and
    for losses); a ValueError naming `key`.mode otherwise. Shared with `checkpoint.keep_best`."""
    if mode != "auto":
        return mode == "max"
    if metric == task.primary_metric:
        return bool(task.higher_is_better)
    if metric in ("loss", "perplexity", "mse"):
        return False
    raise ValueError(f"{key}.metric = {metric!r} is not the task's primary metric: set "
                     f"{key}.mode to 'max' or 'min' to say which direction is better")


def metric_value(record: Any, metric: str, *, key: str) -> float:
    """`metric` of one history record (an `EpochRecord`); a ValueError naming `key`.metric when the
    task does not report it."""
    if metric in record.val_metrics:
        return float(record.val_metrics[metric])
    if metric == "loss":
        return float(record.val_loss)
    raise ValueError(f"{key}.metric = {metric!r}: the task reports {sorted(record.val_metrics)}")
