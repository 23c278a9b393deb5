"""Runs for the logger tests (a uniquely named module: `from conftest import` would depend on
collection order): a small digits run with the loggers of its config attached, stopped after an
epoch when asked, and resumed in the same run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer_fixtures import MemoryBus, StopAfter, small_config  # type: ignore[import-not-found]

from esper.tolaria.config import TolariaConfig
from esper.tolaria.drills import FaultPlan
from esper.tolaria.observe.loggers import loggers_from_config


def logged_config(epochs: int = 3, **sections: dict[str, Any]) -> TolariaConfig:
    """small_config with checkpoints (for resumes) and only the loggers `sections` turn on."""
    loggers = {"csv": {"enabled": False}, **sections.pop("loggers", {})}
    return small_config(run={"epochs": epochs}, checkpoint={"enabled": True}, loggers=loggers, **sections)


def run_logged(config: TolariaConfig, run_dir: Path, *, resume: bool = False, checkpoint: str | None = None,
               stop_after: int | None = None, drills: tuple[str, ...] = (), extra: tuple[Any, ...] = ()) -> Any:
    """Train `config` in `run_dir` with its loggers (and `extra` callbacks); `resume` continues the run
    there, from its newest checkpoint or the committed `checkpoint` named."""
    from esper.tolaria.loop.build import build_trainer

    callbacks = (*loggers_from_config(config, run_dir), *extra,
                 *((StopAfter(stop_after),) if stop_after is not None else ()))
    trainer = build_trainer(config, run_dir=run_dir, bus=MemoryBus(), callbacks=callbacks,
                            faults=FaultPlan.parse(list(drills)))
    if resume:
        trainer.resume_from(run_dir / "checkpoints", name=checkpoint)
    trainer.fit()
    return trainer
