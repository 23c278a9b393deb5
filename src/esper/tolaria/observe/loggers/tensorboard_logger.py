"""`TensorBoardLogger`: scalars against the optimizer step, events and the config as text.

Every scalar uses the global step as its x-axis (epoch metrics too; `epoch` is a scalar of its
own), so step and epoch curves line up. A resume writes a new event file in the same directory
with `purge_step` just past the checkpoint's step: TensorBoard hides what the interrupted segment
wrote after the checkpoint, so a re-run stretch shows once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from esper.tolaria.observe.loggers.protocol import RunEvent, RunStart, Status, require


def summary_writer_class(wanted_by: str) -> Callable[..., Any]:
    """torch's `SummaryWriter`, or `MissingLoggerPackage` naming the install when TensorBoard is missing."""
    require("tensorboard", extra="tensorboard", package="tensorboard", wanted_by=wanted_by)
    module = require("torch.utils.tensorboard", extra="tensorboard", package="tensorboard", wanted_by=wanted_by)
    return module.SummaryWriter  # type: ignore[no-any-return]


def event_line(event: RunEvent) -> str:
    subject = f" {event.seed_id}" if event.seed_id else ""
    return f"epoch {event.epoch}, step {event.step}: {event.kind}{subject} {event.what}: {event.reason}"


class TensorBoardLogger:
    name = "tensorboard"

    def __init__(self, log_dir: Path, *, wanted_by: str = "the TensorBoard logger (loggers.tensorboard.enabled)",
                 writer_factory: Callable[..., Any] | None = None) -> None:
        self.log_dir = log_dir
        self._factory = writer_factory or summary_writer_class(wanted_by)  # checked when configured
        self._writer: Any = None

    def start(self, run: RunStart) -> None:
        purge = run.step + 1 if run.resumed else None  # what was logged at the checkpoint's step stays
        self._writer = self._factory(log_dir=str(self.log_dir), purge_step=purge)
        config = json.dumps(run.config, indent=2, sort_keys=True)
        self._writer.add_text("config", f"run `{run.run_id}`\n\n```json\n{config}\n```", run.step)

    def log_epoch(self, epoch: int, step: int, metrics: Mapping[str, float]) -> None:
        self._scalars({"epoch": float(epoch), **metrics}, step)

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        self._scalars(metrics, step)

    def log_events(self, events: list[RunEvent]) -> None:
        for event in events:
            self._writer.add_text(f"events/{event.kind}", event_line(event), event.step)
        self._writer.flush()

    def _scalars(self, metrics: Mapping[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self, status: Status) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
