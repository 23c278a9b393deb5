"""The one-run report's view of a summary: `RunView` normalises what the plots and the page read
(the history, rollbacks, emergencies, conservative epochs, seed events, resumes and step losses)
once, so a missing or malformed field means "nothing of that kind" everywhere alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper.tolaria.observe.report_data import (
    ResumePoint,
    SeedEvent,
    dicts,
    num,
    resume_points,
    seed_events,
    step_losses,
)


def epochs_of(items: Iterable[Mapping[str, Any]]) -> list[float]:
    """The finite `epoch` fields of records such as rollbacks and emergencies."""
    return [e for e in (num(i.get("epoch")) for i in items) if math.isfinite(e)]


@dataclass
class RunView:
    """The parts of a summary the plots and tables use, normalised once."""

    summary: dict[str, Any]
    history: list[dict[str, Any]]
    rollbacks: list[dict[str, Any]]
    emergencies: list[dict[str, Any]]
    conservative_epochs: list[int]
    seed_events: list[SeedEvent] = field(default_factory=list)
    resumes: list[ResumePoint] = field(default_factory=list)  # filled from the run directory
    step_losses: tuple[list[int], list[float]] = field(default_factory=lambda: ([], []))

    @classmethod
    def of(cls, summary: dict[str, Any], run_dir: Path | None = None) -> RunView:
        """The view of `summary`; with `run_dir`, also its resumes and step losses (files beside it)."""
        conservative = summary.get("conservative_mode") if isinstance(summary.get("conservative_mode"), dict) else {}
        history = dicts(summary.get("history"))
        epochs = {int(e) for e in (conservative or {}).get("epochs", []) if isinstance(e, int)}
        epochs |= {int(num(h.get("epoch"))) for h in history if h.get("conservative_mode") is True
                   and math.isfinite(num(h.get("epoch")))}
        return cls(summary, history, dicts(summary.get("rollbacks")), dicts(summary.get("emergencies")),
                   sorted(epochs), seed_events(summary),
                   resume_points(run_dir, summary) if run_dir is not None else [],
                   step_losses(run_dir) if run_dir is not None else ([], []))

    @property
    def higher_is_better(self) -> bool:
        task = self.summary.get("task") if isinstance(self.summary.get("task"), dict) else {}
        return bool((task or {}).get("higher_is_better", True))

    def best(self, metric: str) -> tuple[float, float]:
        """(best value, its epoch) of a validation metric in the task's direction; NaNs without data."""
        xs, ys = self.metric_series(metric)
        if not ys:
            return math.nan, math.nan
        sign = 1.0 if self.higher_is_better else -1.0
        k = max(range(len(ys)), key=lambda i: sign * ys[i])  # the first epoch reaching the best
        return ys[k], xs[k]

    def metric_series(self, name: str) -> tuple[list[float], list[float]]:
        """(epochs, values) of one validation metric; runs from before tasks carry only val_accuracy."""
        rows = [{"epoch": h.get("epoch"), name: (h.get("val_metrics") or {}).get(name, h.get("val_accuracy"))}
                for h in self.history]
        return RunView(self.summary, rows, [], [], []).series(name)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(epochs, values) of a numeric history key, skipping epochs where it is missing."""
        xs, ys = [], []
        for rec in self.history:
            x, y = num(rec.get("epoch")), num(rec.get(key))
            if math.isfinite(x) and not math.isnan(y):
                xs.append(x)
                ys.append(y)
        return xs, ys


def conservative_spans(epochs: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous runs of epochs as inclusive (first, last) pairs: [1,2,3,7] -> [(1,3),(7,7)]."""
    spans: list[tuple[int, int]] = []
    for epoch in sorted(set(epochs)):
        if spans and epoch == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], epoch)
        else:
            spans.append((epoch, epoch))
    return spans


def primary_metric(summary: dict[str, Any]) -> str:
    """The task's primary metric (accuracy for runs from before tasks)."""
    task = summary.get("task") if isinstance(summary.get("task"), dict) else {}
    return str((task or {}).get("primary_metric") or "accuracy")


def stage_name(value: Any) -> str:
    """A Leyline stage name without its prefix (`SEED_STAGE_CULLED` -> `CULLED`)."""
    return str(value).removeprefix("SEED_STAGE_") or "UNKNOWN"
