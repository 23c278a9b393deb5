"""`WandbLogger`: one Weights & Biases run per Tolaria run.

The W&B run id is Tolaria's run id, which a resume in the same run directory keeps: the resumed
process continues the same W&B run (`resume="allow"`); a branch is a new one. Every metric is
plotted against `global_step` (logged with it, not as W&B's own step, which must only grow and so
would drop what a rollback or a resume re-runs). Events go to the run's summary under their key
(`seed.seed1.CULLED`: the epoch and the reason) and, at the end, to an `events` table. Offline
(`mode = "offline"` or WANDB_MODE=offline) needs no network and no account: the run is written
under WANDB_DIR (default: RUN_DIR) for `wandb sync` to upload later.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import astuple, fields
from pathlib import Path
from typing import Any

from esper.tolaria.observe.loggers.protocol import RunEvent, RunStart, Status, require

WANTED_BY = "the Weights & Biases logger (loggers.wandb.enabled)"


def wandb_run_id(run_id: str) -> str:
    """Tolaria's run id as W&B takes it (W&B ids exclude / \\ # ? % : and other punctuation)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", run_id)[:64]


class WandbLogger:
    name = "wandb"

    def __init__(self, run_dir: Path, *, project: str = "", entity: str = "", mode: str = "") -> None:
        self._wandb = require("wandb", extra="wandb", package="wandb", wanted_by=WANTED_BY)
        self.run_dir = run_dir
        self.project, self.entity, self.mode = project, entity, mode
        self._run: Any = None
        self._events: list[RunEvent] = []

    def start(self, run: RunStart) -> None:
        self._run = self._wandb.init(
            project=self.project or run.name, entity=self.entity or None, mode=self.mode or None,
            id=wandb_run_id(run.run_id), name=run.run_id, resume="allow", config=dict(run.config),
            dir=os.environ.get("WANDB_DIR") or str(self.run_dir))
        self._run.define_metric("global_step")
        self._run.define_metric("*", step_metric="global_step")

    def log_epoch(self, epoch: int, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log({"global_step": step, "epoch": epoch, **metrics})

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log({"global_step": step, **metrics})

    def log_events(self, events: list[RunEvent]) -> None:
        for event in events:
            self._run.summary[event.key] = f"epoch {event.epoch}, step {event.step}: {event.what}: {event.reason}"
        self._events += events

    def close(self, status: Status) -> None:
        if self._run is None:
            return
        if self._events:
            table = self._wandb.Table(columns=[f.name for f in fields(RunEvent)],
                                      data=[list(astuple(e)) for e in self._events])
            self._run.log({"events": table})
        self._run.summary["tolaria.status"] = status
        self._run.finish(exit_code=0 if status != "failed" else 1)
        self._run = None
