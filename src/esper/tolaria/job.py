"""The main job behind `tolaria run` / `tolaria resume`: build, train, write the summary and report."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from esper.tolaria.checkpoint.atomic import atomic_write_bytes
from esper.tolaria.config import TolariaConfig, config_from_dict
from esper.tolaria.faults import FaultPlan
from esper.tolaria.summary import write_summary

log = logging.getLogger(__name__)


def run_job(config: TolariaConfig, run_dir: Path, *, faults: FaultPlan | None = None, progress: bool = True,
            report: bool = True, resume: bool = False) -> dict[str, Any]:
    from esper.tolaria.build import build_trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.json", json.dumps(config.model_dump(mode="json"), indent=2).encode())
    callbacks: tuple[Any, ...] = ()
    if progress:
        from esper.tolaria.progress import RichProgress

        callbacks += (RichProgress(),)
    if config.telemetry.step_log:
        from esper.tolaria.steplog import StepLog

        callbacks += (StepLog(run_dir / "steps.csv"),)
    trainer = build_trainer(config, run_dir=run_dir, faults=faults, callbacks=callbacks)
    if resume:
        trainer.resume_from(run_dir / "checkpoints")
    result = trainer.fit()
    write_summary(result.summary, run_dir)
    if report:
        _write_report(run_dir)
    return result.summary


def resume_job(run_dir: Path, *, epochs: int | None = None, progress: bool = True,
               report: bool = True) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory written by `tolaria run`?")
    data = json.loads(path.read_text())
    if epochs is not None:
        data["run"]["epochs"] = epochs
    return run_job(config_from_dict(data, source=str(path)), run_dir, progress=progress, report=report, resume=True)


def _write_report(run_dir: Path) -> None:
    from esper.tolaria.report import generate_report

    generate_report(run_dir)
