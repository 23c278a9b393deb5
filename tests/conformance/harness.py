"""What the conformance tests share: the uninterrupted reference run, resuming at a chosen
checkpoint, and running the driver in its own process."""

from __future__ import annotations

import atexit
import inspect
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conformance.workloads import architecture, build_trainer
from esper.tolaria.checkpoint.inspect import list_checkpoints
from esper.tolaria.loop.trainer import TolariaTrainer


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


class EveryCheckpointCommitted(BoundaryHashes):
    """Also waits at each boundary for its checkpoint, so none is superseded by the next one while
    still queued (the writer keeps only the newest waiting snapshot) and every epoch has one."""

    def on_boundary_end(self, trainer: TolariaTrainer, epoch: int, report: Any) -> None:
        super().on_boundary_end(trainer, epoch, report)
        assert trainer.checkpoints.store is not None
        trainer.checkpoints.store.flush(timeout=120)


def run_reference(workload: str, run_dir: Path, *, num_workers: int = 0) -> Reference:
    hashes = EveryCheckpointCommitted()
    trainer = build_trainer(workload, run_dir, num_workers=num_workers, callbacks=[hashes])
    trainer.fit()
    stages = {h.stage for history in trainer.log.seed_history.values() for h in history}
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


DRIVER = Path(__file__).with_name("driver.py")


@dataclass
class Exit:
    """How a driver process ended: `code` as `Popen.returncode` (-N for signal N) and its output."""

    code: int
    log: str


class _ForkServer:
    """`driver.py --serve`, started once per test session (see `driver.serve`)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
        self._buffer = b""
        atexit.register(self.close)

    def run(self, argv: list[str], log: Path, timeout: float) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps([argv, str(log)]) + "\n").encode())
        pid = int(self._answer("pid", timeout))
        try:
            return int(self._answer("exit", timeout))
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self._answer("exit", 60)
            raise

    def _answer(self, tag: str, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"no '{tag}' from the driver's fork server within {timeout} s")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the driver's fork server exited ({self.proc.wait()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        name, value = line.decode().split(" ", 1)
        assert name == tag, f"fork server said {line!r}, expected {tag}"
        return value

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(30)


_server: _ForkServer | None = None


def drive(workload: str, run_dir: Path, *args: str, timeout: float = 180) -> tuple[Exit, dict[str, Any] | None]:
    """Run the driver in its own process (forked from `driver.py --serve`); returns how it ended and
    its result file's content, or None when it died before writing one."""
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = _ForkServer()
    result, log = (run_dir.with_name(f"{run_dir.name}.{suffix}") for suffix in ("result.json", "log"))
    result.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    code = _server.run([workload, str(run_dir), "--result", str(result), *args], log, timeout)
    output = log.read_text() if log.exists() else ""
    return Exit(code, output), json.loads(result.read_text()) if result.exists() else None


def failure(exit: Exit) -> str:
    return f"driver exited {exit.code}:\n{exit.log[-4000:]}"
