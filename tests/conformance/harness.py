"""What the conformance tests share: the uninterrupted reference run, resuming at a chosen
checkpoint, and running the driver in its own process."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conformance.workloads import architecture, build_trainer
from esper.tolaria.checkpoint.inspect import list_checkpoints
from esper.tolaria.trainer import TolariaTrainer

DRIVER = Path(__file__).with_name("driver.py")


class BoundaryHashes:
    """Records the model's state hash at every epoch boundary, by global step."""

    def __init__(self) -> None:
        self.by_step: dict[int, str] = {}

    def on_boundary_end(self, trainer: TolariaTrainer, epoch: int, report: Any) -> None:
        self.by_step[trainer.state.global_step] = trainer.final_state_sha256()


class StopAfterBoundaries(BoundaryHashes):
    """Also stops the run (as SIGTERM would) after `count` boundaries."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def on_boundary_end(self, trainer: TolariaTrainer, epoch: int, report: Any) -> None:
        super().on_boundary_end(trainer, epoch, report)
        if len(self.by_step) == self.count:
            trainer.request_stop("conformance: continued far enough")


@dataclass
class Reference:
    """The uninterrupted run of one workload."""

    workload: str
    num_workers: int
    run_dir: Path
    final_state_sha256: str
    architecture: list[list[str]]
    boundary_hashes: dict[int, str]
    stages: set[str]
    checkpoints: list[dict[str, Any]]  # committed and verified, oldest first

    @property
    def steps_per_epoch(self) -> int:
        return min(self.boundary_hashes)

    @property
    def total_steps(self) -> int:
        return max(self.boundary_hashes)


def run_reference(workload: str, run_dir: Path, *, num_workers: int = 0) -> Reference:
    hashes = BoundaryHashes()
    trainer = build_trainer(workload, run_dir, num_workers=num_workers, callbacks=[hashes])
    trainer.fit()
    stages = {h["stage"] for history in trainer.seed_history.values() for h in history}
    checkpoints = [c for c in list_checkpoints(run_dir / "checkpoints") if c["committed"] and c["status"] == "ok"]
    return Reference(workload, num_workers, run_dir, trainer.final_state_sha256(),
                     [list(a) for a in architecture(trainer)], hashes.by_step, stages,
                     sorted(checkpoints, key=lambda c: c["txn_id"]))


def _resume_takes_a_name() -> bool:
    return "name" in inspect.signature(TolariaTrainer.resume_from).parameters


def branch(source: Path, checkpoint: dict[str, Any], run_dir: Path) -> None:
    """Make `run_dir` a run directory to resume from `checkpoint` (an entry of `list_checkpoints(source)`),
    before its trainer is built. The source is never touched: the checkpoints are copied. Where
    `resume_from` cannot pick a checkpoint by name, every newer checkpoint's copy is deleted, so the
    chosen one is the newest committed checkpoint left."""
    target = run_dir / "checkpoints"
    shutil.copytree(source, target)
    if not _resume_takes_a_name():
        for other in list_checkpoints(target):
            if other["txn_id"] > checkpoint["txn_id"]:
                shutil.rmtree(target / other["name"])


def resume_at(trainer: TolariaTrainer, run_dir: Path, checkpoint: dict[str, Any]) -> None:
    """Resume `trainer` from `checkpoint` in a run directory prepared by `branch`."""
    if _resume_takes_a_name():
        trainer.resume_from(run_dir / "checkpoints", name=checkpoint["name"])  # type: ignore[call-arg]
    else:
        trainer.resume_from(run_dir / "checkpoints")


def drive(workload: str, run_dir: Path, *args: str, timeout: float = 180) -> tuple[subprocess.CompletedProcess[str],
                                                                                  dict[str, Any] | None]:
    """Run the driver in its own process; the result file's content, or None when it died first."""
    result = run_dir.with_name(run_dir.name + ".result.json")
    result.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, str(DRIVER), workload, str(run_dir), "--result", str(result), *args],
                          capture_output=True, text=True, timeout=timeout)
    return proc, json.loads(result.read_text()) if result.exists() else None


def failure(proc: subprocess.CompletedProcess[str]) -> str:
    return f"driver exited {proc.returncode}:\n{proc.stderr[-4000:]}"
