"""`Checkpoints`: the run's durable snapshots as recovery uses them: async writes and their
outcomes (the checkpoint breaker), the synchronous stop checkpoint, the newest valid checkpoint
for a full rollback, and resume.

Rank 0 writes (`store`); every rank reads the same directory for a full rollback or a resume.
What it writes are the snapshots' host copies (snapshots.py): the boundary's checkpoint is the very
snapshot the RAM cache holds, the stop checkpoint a host copy made by the same copy engine.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from esper.contracts import EventSink
from esper.leyline import MESSAGE_PRIORITY_HIGH, TELEMETRY_LEVEL_ERROR
from esper.tolaria.checkpoint import (
    BestScore,
    CheckpointInfo,
    CheckpointStore,
    CheckpointSuperseded,
    CheckpointWriteError,
    recover,
)
from esper.tolaria.checkpoint.journal import CommandJournal
from esper.tolaria.control.breakers import CircuitBreaker
from esper.tolaria.distributed import World
from esper.tolaria.observe.runlog import RunLog
from esper.tolaria.state.snapshot import Snapshot

# The keep_best score of a checkpoint that resumes at the given epoch (None: not scored).
Scorer = Callable[[int], BestScore | None]


class Checkpoints:
    def __init__(self, directory: Path | None, store: CheckpointStore | None, *, breaker: CircuitBreaker,
                 journal: CommandJournal, world: World, log: RunLog, events: EventSink,
                 scorer: Scorer | None = None) -> None:
        self.directory = directory  # None: checkpoints are off
        self.store = store  # None on ranks other than 0, or when checkpoints are off
        self.breaker, self.journal, self.world, self.log, self.events = breaker, journal, world, log, events
        self.scorer = scorer  # checkpoint.keep_best; None: off
        self._pending: list[Future[CheckpointInfo]] = []
        self.committed: list[dict[str, Any]] = []

    @property
    def writes(self) -> bool:
        return self.store is not None

    # ---------------------------------------------------------------- writing
    def save_async(self, snapshot: Snapshot) -> None:
        """A boundary's checkpoint, written behind training, with its keep_best score when that is on."""
        if self.store is not None:
            best = self.scorer(snapshot.epoch) if self.scorer is not None else None
            self._pending.append(self.store.save_async(snapshot, best))

    def save_now(self, snapshot: Snapshot, reason: str) -> None:
        """A synchronous checkpoint (e.g. on SIGTERM), after the async writes still in flight."""
        if self.store is None:
            return
        if self._pending:
            self.flush()  # earlier async writes first, so the list stays in order
        try:
            info = self.store.save(snapshot)
        except CheckpointWriteError as exc:
            self.events("checkpoint_write_failed", TELEMETRY_LEVEL_ERROR, error=str(exc), reason=reason)
            return
        self.committed.append({**_described(info), "reason": reason})

    def flush(self) -> None:
        if self.store is not None:
            self.store.flush(timeout=60)
            self.collect()

    def collect(self) -> None:
        """Record finished async writes on the checkpoint breaker (training thread only)."""
        still = []
        for future in self._pending:
            if not future.done():
                still.append(future)
                continue
            error = future.exception()
            if error is None:
                self.breaker.record_success()
                self.committed.append(_described(future.result()))
            elif isinstance(error, CheckpointWriteError):
                opened = self.breaker.record_failure(str(error))
                self.events("checkpoint_write_failed", TELEMETRY_LEVEL_ERROR, MESSAGE_PRIORITY_HIGH,
                            error=str(error), errno=error.errno, breaker_opened=opened)
            elif not isinstance(error, CheckpointSuperseded):  # e.g. the snapshot's copy failed
                opened = self.breaker.record_failure(str(error))
                self.events("checkpoint_failed", TELEMETRY_LEVEL_ERROR, MESSAGE_PRIORITY_HIGH,
                            error=f"{type(error).__name__}: {error}", breaker_opened=opened)
        self._pending = still

    def close(self) -> None:
        if self.store is not None:
            self.store.close(timeout=60)
            self.collect()

    # ---------------------------------------------------------------- reading
    def newest(self, before_epoch: int | None = None) -> Snapshot | None:
        """The newest valid committed checkpoint (with `before_epoch`, the newest that resumes before
        that epoch), read by every rank alike (a full rollback)."""
        if self.directory is None:
            return None
        self.flush()
        self.world.barrier()  # every rank reads the same committed checkpoint
        # The commands journaled after it are NOT replayed: the run failed after them, so Tamiyo
        # decides again; the rollback journals a REWIND that retires them.
        result = recover(self.directory, clean=False, before_epoch=before_epoch)
        self.log.recovery_events += result.events
        return result.checkpoint.snapshot() if result.checkpoint is not None else None

    def resume_from(self, directory: Path, *, name: str | None = None) -> Snapshot:
        """The snapshot to resume from: the newest valid checkpoint in `directory`, or `name`."""
        # Only this run's own directory is cleaned: a branch reads another run without changing it.
        own = self.owns(directory)
        clean = self.world.is_leader and own
        result = recover(directory, clean=clean, name=name) if name else recover(directory, clean=clean)
        self.log.recovery_events += result.events
        if result.checkpoint is None:
            raise FileNotFoundError(f"no valid committed checkpoint in {directory}: "
                                    f"{'; '.join(result.events) or 'the directory holds none'}")
        chosen, size = result.checkpoint, self.world.size
        written_by = chosen.manifest.world_size
        if written_by and written_by != size:
            raise ValueError(f"{chosen.name} was written by a job of {written_by} process(es); resume it "
                             f"with the same world size (torchrun --nproc-per-node {written_by}), not "
                             f"{size}, so the data order and results stay exact")
        if name is None:  # continuing the run: the boundaries it passed after the checkpoint replay
            self.journal.replay(result.commands)
        elif own:  # a branch in this run's own WAL: what followed the checkpoint is abandoned
            self.journal.rewind(step=chosen.step, epoch=chosen.epoch, reason=f"branch from {chosen.name}")
        return chosen.snapshot()

    def owns(self, directory: Path) -> bool:
        """Whether `directory` is this run's own checkpoint directory."""
        return self.directory is not None and Path(directory).resolve() == self.directory.resolve()

    def adopt_run_id(self, run_id: str) -> None:
        if self.store is not None:
            self.store.run_id = run_id

    def summary(self) -> dict[str, Any]:
        best = [_described(info) for info in self.store.best()] if self.store is not None else []
        return {"checkpoints": self.committed, "checkpoint_dir": str(self.directory or ""),
                "best_checkpoints": best, "recovery_events": self.log.recovery_events}


def _described(info: CheckpointInfo) -> dict[str, Any]:
    return {"name": info.name, "epoch": info.epoch, "step": info.step, "size_bytes": info.size_bytes,
            "best": info.best.as_dict() if info.best is not None else None}
