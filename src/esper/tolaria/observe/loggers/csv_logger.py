"""`CsvLogger`: RUN_DIR/metrics.csv, one row per epoch, and RUN_DIR/events.csv, one row per event.

Each file starts with a header row. Its columns are fixed when the file is created: a resumed
run reads the header back and keeps writing those columns (a value it no longer has is left
empty), so a file stays one table however many times the run was resumed. metrics.csv holds the
run-level metrics; the LR of a seed's own group (`lr/<seed>`, which comes and goes with the
seed) goes only to the trackers. Like steps.csv, a resume or a rollback appends the epochs it
re-runs: the last row for an epoch is the one that counts. With `loggers.step_every`,
RUN_DIR/step_metrics.csv holds the logged steps.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from esper.tolaria.observe.loggers.protocol import RunEvent, RunStart, Status

EVENT_COLUMNS = [f.name for f in fields(RunEvent)]


def _per_seed(name: str) -> bool:
    return name.startswith("lr/") and name != "lr/host"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # 'nan', 'inf': what float() reads back
    return "" if value is None else str(value)


class CsvTable:
    """One CSV file with a fixed header: written by the first row, read back when the file exists."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.columns: list[str] | None = None

    def open(self) -> None:
        if self.path.is_file() and self.path.stat().st_size:
            with self.path.open(newline="", encoding="utf-8") as handle:
                self.columns = next(csv.reader(handle), None)

    def append(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
        """Append `rows`; `columns` are used only for a new file's header."""
        new = self.columns is None
        header = self.columns = list(columns) if self.columns is None else self.columns
        with self.path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(header)
            writer.writerows([_cell(row.get(c)) for c in header] for row in rows)


class CsvLogger:
    name = "csv"

    def __init__(self, run_dir: Path) -> None:
        self.metrics = CsvTable(run_dir / "metrics.csv")
        self.events = CsvTable(run_dir / "events.csv")
        self.steps = CsvTable(run_dir / "step_metrics.csv")

    def start(self, run: RunStart) -> None:
        for table in (self.metrics, self.events, self.steps):
            table.open()

    def log_epoch(self, epoch: int, step: int, metrics: Mapping[str, float]) -> None:
        row = {"epoch": epoch, "global_step": step, **metrics}
        self.metrics.append([row], ["epoch", "global_step", *(k for k in metrics if not _per_seed(k))])

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        self.steps.append([{"global_step": step, **metrics}], ["global_step", *metrics])

    def log_events(self, events: list[RunEvent]) -> None:
        self.events.append([asdict(e) for e in events], EVENT_COLUMNS)

    def close(self, status: Status) -> None:
        """Nothing stays open: each call wrote and closed its file."""
