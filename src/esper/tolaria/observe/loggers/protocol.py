"""The one small protocol every experiment logger implements, and what crosses it.

A logger receives plain values only (never the trainer): the run's identity and config once
(`start`), a flat `{name: float}` of metrics per epoch and, when asked, per step, each seed
transition, rollback and emergency as a `RunEvent`, and `close` with how the run ended.
`LoggerCallback` (callback.py) reads the trainer and calls these.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, Protocol

Status = Literal["finished", "stopped", "failed"]


@dataclass(frozen=True)
class RunStart:
    run_id: str  # Tolaria's run id: kept by a resume in the same run directory, new for a branch
    name: str  # run.name
    config: Mapping[str, Any]  # the effective config as JSON values
    resumed: bool
    step: int  # the optimizer step the run starts from (a resume's checkpoint)


@dataclass(frozen=True)
class RunEvent:
    """One thing that happened to the run. `key` names it stably (`seed.seed1.CULLED`, `rollback.0`),
    so a resumed run that meets the same event again overwrites rather than duplicates."""

    kind: Literal["seed", "rollback", "emergency"]
    key: str
    epoch: int
    step: int
    what: str  # the seed's new stage, the rollback's tier, the emergency's level
    seed_id: str
    reason: str


class Logger(Protocol):
    name: str

    def start(self, run: RunStart) -> None:
        """The run begins (or resumes): open files or runs, record the config."""

    def log_epoch(self, epoch: int, step: int, metrics: Mapping[str, float]) -> None:
        """The epoch `epoch` ended at optimizer step `step`."""

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Optimizer step `step` (`loggers.step_every`)."""

    def log_events(self, events: list[RunEvent]) -> None:
        """Events since the last call, oldest first."""

    def close(self, status: Status) -> None:
        """The run ended; flush and release everything."""


class MissingLoggerPackage(ImportError, ValueError):
    """A configured logger's package is not installed; the message names the `pip install`.
    A ValueError too, so the command line prints it as an error instead of a traceback."""


def require(module: str, *, extra: str, package: str, wanted_by: str) -> ModuleType:
    """Import `module` for `wanted_by` (what the user turned on), or raise `MissingLoggerPackage`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingLoggerPackage(
            f"{wanted_by} needs {package}, which is not installed ({exc}): run "
            f"`pip install \"esper-tolaria[{extra}]\"` (or `pip install {package}`)") from None
