"""`checkpoint.keep_best`: the score each boundary checkpoint carries (ranking and retention are in
`checkpoint/best.py` and the store).

Like early stopping it keeps no state of its own: the score is read from the run's history when the
boundary's snapshot is handed to the checkpoint writer, so a resumed or rolled-back run scores its
checkpoints exactly as the uninterrupted one would. Its metric lookup and direction are early
stopping's.
"""

from __future__ import annotations

import math
from typing import Any

from esper.tolaria.checkpoint.best import BestScore
from esper.tolaria.config import KeepBestConfig
from esper.tolaria.loop.early_stopping import higher_is_better, metric_value
from esper.tolaria.observe.runlog import RunLog

KEY = "checkpoint.keep_best"


class BestScorer:
    """Scores a checkpoint by the watched metric of the epoch it follows; built with the run's task,
    so a metric without a known direction fails before training."""

    def __init__(self, config: KeepBestConfig, task: Any, log: RunLog) -> None:
        self.metric = config.metric or task.primary_metric
        self.mode = "max" if higher_is_better(config.mode, self.metric, task, key=KEY) else "min"
        self.top_k, self.log = config.top_k, log

    def __call__(self, resumes_at: int) -> BestScore | None:
        """The score of a checkpoint that resumes at epoch `resumes_at`: the metric of epoch
        `resumes_at - 1` when that is the last finished epoch (a boundary checkpoint), else None
        (the starting state, a mid-epoch stop). A non-finite value is never best."""
        last = self.log.epochs[-1] if self.log.epochs else None
        if last is None or last.epoch != resumes_at - 1:
            return None
        value = metric_value(last, self.metric, key=KEY)
        return BestScore(self.metric, self.mode, value, last.epoch, self.top_k) if math.isfinite(value) else None


def best_scorer(config: KeepBestConfig, task: Any, log: RunLog) -> BestScorer | None:
    """The scorer when keep_best is on (top_k > 0), else None."""
    return BestScorer(config, task, log) if config.top_k else None
