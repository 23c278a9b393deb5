"""The main job behind `tolaria run` / `tolaria resume`: build, train, write the summary and report.

Under torchrun every rank runs this; rank 0 writes `config.json`, `summary.json`, `steps.csv`
and the report, and the other ranks write `summary.rank<R>.json` so runs can be compared.

A lost peer (`distributed.PeerLost`: a collective timed out or its peer died) ends this rank: the
trainer has flushed its checkpoint writes, one line says what happened, and the process exits
with status 75 (`leave`). Under `torchrun --max-restarts N` the restarted attempt
(`TORCHELASTIC_RESTART_COUNT` > 0) of the same job (`TORCHELASTIC_RUN_ID`, recorded in
RUN_DIR/torchelastic.json) continues from RUN_DIR's last committed checkpoint by itself, exactly
as `tolaria resume RUN_DIR` would.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from esper.tolaria.checkpoint import atomic_write_bytes, list_checkpoints
from esper.tolaria.checkpoint.best import BEST
from esper.tolaria.checkpoint.layout import CKPT_RE
from esper.tolaria.config import TolariaConfig, config_from_dict
from esper.tolaria.distributed import PEER_LOST_EXIT, PeerLost, World, leave
from esper.tolaria.drills import FaultPlan
from esper.tolaria.observe.summary import write_summary
from esper.tolaria.run_dir import Mode, RunDirClaim

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues from: a checkpoints directory and, optionally, one committed checkpoint
    in it (`ckpt-...`); without `name` the newest one that verifies."""

    checkpoints: Path
    name: str | None = None


def run_job(config: TolariaConfig, run_dir: Path, *, faults: FaultPlan | None = None, progress: bool = True,
            report: bool = True, resume: bool | ResumePoint = False, overwrite: bool = False,
            world: World | None = None) -> dict[str, Any]:
    """Build, train and write the run. `resume=True` continues RUN_DIR from its own checkpoints;
    a `ResumePoint` elsewhere starts RUN_DIR (absent or empty) from that checkpoint. Nothing is
    written into RUN_DIR before the trainer is built and restored (`run_dir.RunDirClaim`)."""
    world = (world or World()).with_timeout(config.distributed.timeout_s)
    try:
        with _signals_wait_while_leaving(world):
            return _run_job(config, run_dir, faults=faults, progress=progress, report=report, resume=resume,
                            overwrite=overwrite, world=world)
    except PeerLost as exc:
        leave(f"tolaria: {exc}. This rank leaves with status {PEER_LOST_EXIT}; the job continues from rank 0's "
              f"last committed checkpoint in {run_dir / 'checkpoints'}: by itself under torchrun --max-restarts, "
              f"else with `tolaria resume {run_dir}`")


def _run_job(config: TolariaConfig, run_dir: Path, *, faults: FaultPlan | None, progress: bool, report: bool,
             resume: bool | ResumePoint, overwrite: bool, world: World) -> dict[str, Any]:
    resume, overwrite = _restarted(_elastic_attempt(config, run_dir, world), run_dir, resume, overwrite)
    point = ResumePoint(run_dir / "checkpoints") if resume is True else resume or None
    same = point is not None and _same_run(point, run_dir)
    if overwrite and same:
        raise ValueError(f"--overwrite would delete {run_dir}, the run being resumed: drop --overwrite, or give "
                         f"the branch its own --run-dir")
    mode: Mode = "overwrite" if overwrite else "continue" if same else "new"
    claim = RunDirClaim.open(run_dir, mode) if world.is_leader else None
    try:
        trainer = _build(config, run_dir, point, faults=faults, progress=progress, world=world)
    except BaseException:
        if claim is not None:
            claim.abort()
        raise
    if claim is not None:
        claim.commit()  # the trainer writes config.json as fit() starts, and summary.json at its end
        _mark_elastic_job(config, run_dir)
    result = trainer.fit()
    summary = result.summary
    summary["ranks_final_state_match"] = _ranks_agree(world, summary["final_state_sha256"])
    if world.is_leader:
        write_summary(summary, run_dir)
        if report:
            _write_report(run_dir)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)  # the leader claimed it; this rank may be on another host
        write_summary(summary, run_dir, name=f"summary.rank{world.rank}.json")
    return summary


@contextmanager
def _signals_wait_while_leaving(world: World) -> Iterator[None]:
    """Under torchrun: SIGTERM and SIGINT do not end a rank whose collective failed before it has
    flushed its checkpoint writes; otherwise they act as before.

    Why: when one rank dies, torchrun stops the rest at once with SIGTERM. A survivor is by then in
    `fit()`'s failure path, outside the trainer's own handlers (`stop_on_signals`), closing its
    components; rank 0 may be writing the epoch's checkpoint. Killed there, it loses that checkpoint
    and leaves its temp files. It leaves by itself right after (`leave`), well inside the grace
    torchrun gives before SIGKILL."""
    if not world.distributed or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if world.sync.lost:
            return  # leaving already, through `leave`, once the writes are flushed
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        elif before != signal.SIG_IGN:  # the default action (SIGTERM: end the process), as if never caught
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    previous: dict[int, Any] = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


ELASTIC_MARK = "torchelastic.json"  # which torchrun job (and config) wrote RUN_DIR


def _elastic_job() -> str | None:
    """torchrun's id of this job, shared by all its restarts; None outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def _mark_elastic_job(config: TolariaConfig, run_dir: Path) -> None:
    job = _elastic_job()
    if job is not None:
        mark = {"torchelastic_run_id": job, "config_sha256": config.sha256()}
        atomic_write_bytes(run_dir / ELASTIC_MARK, json.dumps(mark).encode())


def _elastic_attempt(config: TolariaConfig, run_dir: Path, world: World) -> str | None:
    """Under `torchrun --max-restarts`, what a restarted attempt does with RUN_DIR: "resume" when an
    earlier attempt of this job (same torchrun id, same config) left a committed checkpoint there,
    "overwrite" when it left only its start; None on the first attempt or for another job's
    directory. Rank 0 decides and every rank follows (one broadcast)."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0:
        return None
    decided = None
    if world.is_leader:
        try:
            mark = json.loads((run_dir / ELASTIC_MARK).read_text())
        except (OSError, ValueError):
            mark = {}
        if mark == {"torchelastic_run_id": _elastic_job(), "config_sha256": config.sha256()}:
            ok = (run_dir / "checkpoints").is_dir() and any(
                c["status"] == "ok" for c in list_checkpoints(run_dir / "checkpoints"))
            decided = "resume" if ok else "overwrite"
    return world.broadcast_object(decided)  # type: ignore[no-any-return]


def _restarted(elastic: str | None, run_dir: Path, resume: bool | ResumePoint,
               overwrite: bool) -> tuple[bool | ResumePoint, bool]:
    """What a restarted torchrun attempt does instead of what its command line says (which asked for
    the first attempt's start): continue RUN_DIR from the checkpoints the attempts before it committed
    there ("resume"), whatever the command resumed from; with none committed ("overwrite"), make the
    same start again over their leftovers. A resume within RUN_DIR's own checkpoints is never turned
    into an overwrite: that would delete what it resumes from."""
    if elastic == "resume":
        return True, False
    own = resume is True or (isinstance(resume, ResumePoint) and _same_run(resume, run_dir))
    if elastic == "overwrite" and not own:
        return resume, True
    return resume, overwrite


def _same_run(point: ResumePoint, run_dir: Path) -> bool:
    return point.checkpoints.resolve() == (run_dir / "checkpoints").resolve()


def _build(config: TolariaConfig, run_dir: Path, point: ResumePoint | None, *, faults: FaultPlan | None,
           progress: bool, world: World) -> Any:
    from esper.tolaria.loop.build import build_trainer

    trainer = build_trainer(config, run_dir=run_dir, faults=faults,
                            callbacks=_callbacks(config, run_dir, world, progress), world=world)
    if point is None:
        return trainer
    try:
        trainer.resume_from(point.checkpoints, name=point.name)
    except BaseException:
        trainer.close()
        raise
    if world.is_leader:
        for event in trainer.log.recovery_events:
            print(f"tolaria resume: skipped {event}", file=sys.stderr)
    return trainer


def _callbacks(config: TolariaConfig, run_dir: Path, world: World, progress: bool) -> tuple[Any, ...]:
    callbacks: tuple[Any, ...] = ()
    if progress and world.is_leader:
        from esper.tolaria.observe.progress import ConsoleProgress

        callbacks += (ConsoleProgress(),)
    if world.is_leader and config.exporters.prometheus_port:
        from esper.tolaria.observe.exporters import ExporterCallback, PrometheusExporter

        callbacks += (ExporterCallback(PrometheusExporter(config.exporters.prometheus_port)),)
    if world.is_leader:  # CSV by default; TensorBoard, MLflow, W&B when [loggers] asks (a missing package stops here)
        from esper.tolaria.observe.loggers import loggers_from_config

        callbacks += tuple(loggers_from_config(config, run_dir))
    if config.telemetry.step_log and world.is_leader:
        from esper.tolaria.observe.steplog import StepLog

        callbacks += (StepLog(run_dir / "steps.csv"),)
    return callbacks


def _ranks_agree(world: World, digest: str) -> bool:
    """Whether every rank ended with the same model state (always true for one process)."""
    return len(set(world.gather_objects(digest))) == 1


def resume_job(run_dir: Path, *, epochs: int | None = None, progress: bool = True, report: bool = True,
               world: World | None = None, checkpoint: str | None = None, into: Path | None = None,
               overwrite: bool = False) -> dict[str, Any]:
    """Continue RUN_DIR with its own config.json: from its newest valid checkpoint, or from the
    committed `checkpoint` (a `ckpt-...` name or a path to it) when given; `into` another folder
    (absent or empty, or `overwrite`) branches there with a copy of the config."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory written by `tolaria run`?")
    data = json.loads(path.read_text())
    if epochs is not None:
        data["run"]["epochs"] = epochs
    point = ResumePoint(run_dir / "checkpoints", checkpoint_name(run_dir, checkpoint) if checkpoint else None)
    return run_job(config_from_dict(data, source=str(path)), into or run_dir, progress=progress, report=report,
                   resume=point, overwrite=overwrite, world=world)


def checkpoint_name(run_dir: Path, checkpoint: str) -> str:
    """The name of `checkpoint` (`ckpt-...` as `tolaria inspect` lists it, a path to one of RUN_DIR's
    checkpoints, or `best`, which recovery resolves); raises ValueError for anything else."""
    if checkpoint == BEST or CKPT_RE.match(checkpoint):
        return checkpoint
    given = Path(checkpoint)
    if CKPT_RE.match(given.name) and given.parent.resolve() == (run_dir / "checkpoints").resolve():
        return given.name
    raise ValueError(f"--from {checkpoint}: name one of {run_dir}'s checkpoints, as `tolaria inspect {run_dir}` "
                     f"lists them (ckpt-...), give the path {run_dir / 'checkpoints'}/ckpt-..., or say `best`")


def _write_report(run_dir: Path) -> None:
    from esper.tolaria.observe.report import generate_report

    generate_report(run_dir)
