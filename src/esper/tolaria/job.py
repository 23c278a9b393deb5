"""The main job behind `tolaria run` / `tolaria resume`: build, train, write the summary and report.

Under torchrun every rank runs this; rank 0 writes `config.json`, `summary.json`, `steps.csv`
and the report, and the other ranks write `summary.rank<R>.json` so runs can be compared.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from esper.tolaria.checkpoint.atomic import atomic_write_bytes
from esper.tolaria.config import TolariaConfig, config_from_dict
from esper.tolaria.distributed import World
from esper.tolaria.faults import FaultPlan
from esper.tolaria.summary import write_summary

log = logging.getLogger(__name__)


def run_job(config: TolariaConfig, run_dir: Path, *, faults: FaultPlan | None = None, progress: bool = True,
            report: bool = True, resume: bool = False, world: World | None = None) -> dict[str, Any]:
    from esper.tolaria.build import build_trainer

    world = world or World()
    run_dir.mkdir(parents=True, exist_ok=True)
    if world.is_leader:
        atomic_write_bytes(run_dir / "config.json", json.dumps(config.model_dump(mode="json"), indent=2).encode())
    trainer = build_trainer(config, run_dir=run_dir, faults=faults, callbacks=_callbacks(config, run_dir, world,
                                                                                         progress), world=world)
    if resume:
        trainer.resume_from(run_dir / "checkpoints")
    result = trainer.fit()
    summary = result.summary
    summary["ranks_final_state_match"] = _ranks_agree(world, summary["final_state_sha256"])
    if world.is_leader:
        write_summary(summary, run_dir)
        if report:
            _write_report(run_dir)
    else:
        write_summary(summary, run_dir, name=f"summary.rank{world.rank}.json")
    return summary


def _callbacks(config: TolariaConfig, run_dir: Path, world: World, progress: bool) -> tuple[Any, ...]:
    callbacks: tuple[Any, ...] = ()
    if progress and world.is_leader:
        from esper.tolaria.progress import RichProgress

        callbacks += (RichProgress(),)
    if world.is_leader and (config.exporters.prometheus_port or config.exporters.tensorboard_dir):
        from esper.tolaria.exporters import ExporterCallback, PrometheusExporter, TensorBoardExporter

        if config.exporters.prometheus_port:
            callbacks += (ExporterCallback(PrometheusExporter(config.exporters.prometheus_port)),)
        if config.exporters.tensorboard_dir:
            callbacks += (ExporterCallback(TensorBoardExporter(Path(config.exporters.tensorboard_dir))),)
    if config.telemetry.step_log and world.is_leader:
        from esper.tolaria.steplog import StepLog

        callbacks += (StepLog(run_dir / "steps.csv"),)
    return callbacks


def _ranks_agree(world: World, digest: str) -> bool:
    """Whether every rank ended with the same model state (always true for one process)."""
    if not world.distributed:
        return True
    import torch.distributed as dist

    digests: list[str | None] = [None] * world.size
    dist.all_gather_object(digests, digest)
    return len(set(digests)) == 1


def resume_job(run_dir: Path, *, epochs: int | None = None, progress: bool = True, report: bool = True,
               world: World | None = None) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory written by `tolaria run`?")
    data = json.loads(path.read_text())
    if epochs is not None:
        data["run"]["epochs"] = epochs
    return run_job(config_from_dict(data, source=str(path)), run_dir, progress=progress, report=report, resume=True,
                   world=world)


def _write_report(run_dir: Path) -> None:
    from esper.tolaria.report import generate_report

    generate_report(run_dir)
