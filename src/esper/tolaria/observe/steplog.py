"""`RUN_DIR/steps.csv`: the loss of every step, for comparing two runs exactly (`telemetry.step_log`).

The file starts with the header `global_step,loss` (the step's index: the global step it ran at,
from 0; `skipped` for a step whose update was dropped). Lines are buffered and flushed at every
boundary, so every step before a checkpoint is on disk by the time the checkpoint exists; a
resumed run appends the steps it re-runs (no second header), and the last line for a step is
the one that counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HEADER = "global_step,loss\n"


class StepLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lines: list[str] = []

    def on_step_end(self, trainer: Any, step: int, loss: Any) -> None:
        value = "skipped" if loss is None else repr(float(loss))
        self._lines.append(f"{step - 1},{value}\n")

    def on_boundary_end(self, trainer: Any, epoch: int, report: Any) -> None:
        self.flush()

    def on_fit_end(self, trainer: Any) -> None:
        self.flush()

    def flush(self) -> None:
        if self._lines:
            new = not self.path.is_file() or self.path.stat().st_size == 0
            with self.path.open("a", encoding="utf-8") as handle:
                handle.writelines([HEADER, *self._lines] if new else self._lines)
            self._lines = []


def read_step_log(path: Path) -> dict[int, str]:
    """step -> loss text; a re-run step's later line wins. Reads files written before the header too."""
    out: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        step, value = line.split(",", 1)
        if line + "\n" != HEADER:
            out[int(step)] = value
    return out
