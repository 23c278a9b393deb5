"""Durable checkpoint store: atomic files, a WAL transaction per checkpoint, retention, async writes.

Write protocol for one snapshot (txn = next transaction id):

    WAL BEGIN(txn) -> write model.pt, state.pt, manifest.pb atomically into `.ckpt-<step>.<txn>.tmp/`
    -> fsync that directory -> rename it to its name -> fsync the root -> WAL COMMIT(txn, name)
    -> retire superseded checkpoints (same step, then beyond `keep_last`, never the `keep_best` best)

The name is `ckpt-<step:012d>`, or `ckpt-<step:012d>.t<txn>` when that name is taken (the step was
checkpointed before, e.g. reached again after a rollback): a committed checkpoint is never moved,
overwritten or deleted before the COMMIT that supersedes it is durable. "Newest" is the highest
committed txn, so a branch resumed from an older checkpoint supersedes the abandoned branch.
A checkpoint exists only once its COMMIT is durable. Any OSError on the way -> WAL ABORT(txn),
staging and the uncommitted dir removed, older checkpoints untouched, `CheckpointWriteError`
raised (and kept in `last_error`); the trainer's checkpoint breaker decides what follows.
Retiring renames a dir to a hidden `.tmp` name first, so a crash mid-delete leaves a leftover
that start-up cleans, never a half-deleted checkpoint.

`crash_point(label)`, when set, is called before every durable step of that sequence (each
file write, fsync, rename, WAL append, removal); tests use it to simulate a crash at each one.

Async: `save_async` hands the snapshot (already a host copy, see snapshot.py) to ONE long-lived
writer thread, which serialises from those host buffers once their copy is complete: no
device-to-host copy runs on the training thread. At most one request waits behind the running
write: a newer request replaces the waiting one, whose future fails with CheckpointSuperseded
(newest wins: an older snapshot is never worth writing once a newer one is queued).
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from esper.leyline import AdaptationCommand, CheckpointFile, CheckpointManifest, now_timestamp, serialize
from esper.tolaria.checkpoint.atomic import CrashPoint, atomic_write_bytes, fsync_dir
from esper.tolaria.checkpoint.best import BestScore, ranked_best
from esper.tolaria.checkpoint.layout import (
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointStateError,
    CommitInfo,
    checkpoint_name,
    crc32c_of,
    dumps_state,
    encode_commit,
    is_leftover,
    remove_path,
    sha256_hex,
)
from esper.tolaria.checkpoint.recovery import checkpoint_dirs, committed_index, max_manifest_txn
from esper.tolaria.checkpoint.wal import RecordType, WriteAheadLog
from esper.tolaria.checkpoint.wal import replay as replay_wal
from esper.tolaria.state.snapshot import Snapshot

# `fault(relative_name)` is called just before each checkpoint file is written; drills and tests
# raise OSError(errno.ENOSPC, ...) from it to rehearse a full disk.
FaultFn = Callable[[str], None]


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be made durable. Older checkpoints are intact; `errno` is the cause's."""

    def __init__(self, name: str, cause: OSError) -> None:
        hint = "free disk space or move the run directory" if cause.errno == errno.ENOSPC else "check the disk"
        super().__init__(f"checkpoint {name} not written: {cause}; previous checkpoints are intact; {hint}")
        self.checkpoint = name
        self.errno = cause.errno
        self.cause = cause


class CheckpointSuperseded(RuntimeError):
    """Set on a queued async save that a newer `save_async` replaced before it started."""


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    path: Path
    txn_id: int
    epoch: int
    step: int
    size_bytes: int
    best: BestScore | None = None  # its keep_best score, carried in its COMMIT


class CheckpointStore:
    """The single writer of a checkpoint directory (one store per directory at a time)."""

    def __init__(self, directory: str | os.PathLike[str], *, keep_last: int = 3, keep_best: int = 0,
                 wal_max_bytes: int = 16 * 1024 * 1024, fsync: bool = True, fault: FaultFn | None = None,
                 run_id: str = "", config_sha256: str = "", world_size: int = 1,
                 crash_point: CrashPoint | None = None) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: keep at least 1 committed checkpoint")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self.keep_best = keep_best  # best-scored checkpoints retention never retires (0: none)
        self.fsync = fsync
        self.fault = fault
        self.run_id = run_id
        self.config_sha256 = config_sha256
        self.world_size = world_size
        self.crash_point = crash_point
        self.last_error: CheckpointWriteError | None = None
        self.events: deque[str] = deque(maxlen=100)  # notable store events, newest last
        self._committed: dict[str, CheckpointInfo] = {}
        self._taken: set[str] = set()  # names a COMMIT has ever named or a dir holds: never reused
        self._next_txn = 1
        self._load_index()
        self._wal = WriteAheadLog(self.directory, max_bytes=wal_max_bytes, fsync=fsync)
        self._write_lock = threading.Lock()
        self._cond = threading.Condition()
        self._pending: tuple[Snapshot, BestScore | None, Future[CheckpointInfo]] | None = None
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._remove_leftovers()

    # ------------------------------------------------------------------ public

    def save(self, snapshot: Snapshot, best: BestScore | None = None) -> CheckpointInfo:
        """Write `snapshot` durably on the calling thread; raises CheckpointWriteError. `best`, its
        keep_best score, is committed with it (see best.py)."""
        if self._closed:
            raise ValueError("CheckpointStore is closed; open a new store to write checkpoints")
        with self._write_lock:
            return self._save(snapshot, best)

    def save_async(self, snapshot: Snapshot, best: BestScore | None = None) -> Future[CheckpointInfo]:
        """Queue `snapshot` (and its score) for the writer thread and return at once (newest queued
        request wins)."""
        future: Future[CheckpointInfo] = Future()
        with self._cond:
            if self._closed:
                raise ValueError("CheckpointStore is closed; open a new store to write checkpoints")
            if self._pending is not None:
                *_, older = self._pending
                if not older.done():  # the caller may have cancelled it already
                    superseded = f"superseded by the snapshot of step {snapshot.global_step}"
                    older.set_exception(CheckpointSuperseded(superseded))
            self._pending = (snapshot, best, future)
            self._ensure_writer()
            self._cond.notify_all()
        return future

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until no async write is running or queued; False if `timeout` expired first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish queued writes, stop the writer thread and close the WAL. False if writes timed out."""
        drained = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if drained:
            self._wal.close()
        return drained

    def journal_command(self, command: AdaptationCommand, *, epoch: int, step: int) -> None:
        """Append an AdaptationCommand to the WAL (durable on return), tied to the latest transaction.
        Safe beside the writer thread: the WAL serializes appends, and this never waits for a write."""
        self._wal.append(RecordType.COMMAND, self._next_txn - 1, epoch, step, serialize(command))

    def journal_rewind(self, *, epoch: int, step: int, reason: str) -> None:
        """Record that training went back to `step` (durable on return): commands journaled after
        `step` belong to an abandoned history and are not replayed on resume."""
        self._wal.append(RecordType.REWIND, self._next_txn - 1, epoch, step, reason.encode()[:4096])

    def committed(self) -> list[CheckpointInfo]:
        """Committed checkpoints this store knows of, newest first."""
        return sorted(self._committed.values(), key=lambda c: c.txn_id, reverse=True)

    def latest(self) -> CheckpointInfo | None:
        found = self.committed()
        return found[0] if found else None

    # ------------------------------------------------------------------ the write

    def best(self) -> list[CheckpointInfo]:
        """The committed checkpoints kept as best, best first (at most `keep_best`)."""
        return ranked_best(self._committed.values(), self.keep_best) if self.keep_best else []

    def _save(self, snapshot: Snapshot, best: BestScore | None) -> CheckpointInfo:
        snapshot.wait_ready()  # its host buffers are complete only then (copy-behind; a CUDA copy's event)
        blobs = _serialize(snapshot)  # CheckpointStateError here touches no file and no WAL record
        txn = self._next_txn
        self._next_txn += 1
        epoch, step = snapshot.epoch, snapshot.global_step
        name = checkpoint_name(step)
        if name in self._taken or (self.directory / name).exists():
            name = checkpoint_name(step, txn)
        staging = self.directory / f".{checkpoint_name(step)}.{txn}.tmp"
        final = self.directory / name
        try:
            self._crash("wal-append BEGIN")
            self._wal.append(RecordType.BEGIN, txn, epoch, step, name.encode())
            staging.mkdir()
            manifest_bytes = self._write_files(staging, name, txn, snapshot, blobs)
            self._crash(f"rename {staging.name} -> {name}")
            staging.rename(final)
            if self.fsync:
                self._crash("fsync-dir root")
                fsync_dir(self.directory)
            self._crash("wal-append COMMIT")
            self._wal.append(RecordType.COMMIT, txn, epoch, step,
                             encode_commit(CommitInfo(name, sha256_hex(manifest_bytes), best)))
        except OSError as exc:
            self.last_error = CheckpointWriteError(name, exc)
            self._undo(name, txn, epoch, step, staging, final)
            raise self.last_error from exc
        except BaseException:
            self._undo(name, txn, epoch, step, staging, final)  # e.g. a drill's InjectedFault
            raise
        size = sum(len(b) for b in blobs.values()) + len(manifest_bytes)
        info = CheckpointInfo(name, final, txn, epoch, step, size, best)
        self._committed[name] = info
        self._taken.add(name)
        self.last_error = None
        try:
            self._retain()
        except OSError as exc:  # committed all the same; what is left over is retired next time
            self.events.append(f"{name} committed, but retiring superseded checkpoints failed: {exc}; "
                               "the next commit or start-up retries")
        return info

    def _crash(self, label: str) -> None:
        if self.crash_point is not None:
            self.crash_point(label)

    def _write_files(self, staging: Path, name: str, txn: int, snapshot: Snapshot, blobs: dict[str, bytes]) -> bytes:
        manifest = CheckpointManifest(
            checkpoint_id=name, txn_id=txn, epoch=snapshot.epoch, global_step=snapshot.global_step,
            run_id=self.run_id, config_sha256=self.config_sha256, created_at=now_timestamp(),
            world_size=self.world_size,
            files=[CheckpointFile(name=f, size_bytes=len(b), crc32c=crc32c_of(b)) for f, b in blobs.items()],
        )
        manifest_bytes = manifest.SerializeToString(deterministic=True)
        # manifest last: its presence means the data files are complete
        for file_name, data in (*blobs.items(), (MANIFEST_FILE, manifest_bytes)):
            if self.fault is not None:
                self.fault(f"{name}/{file_name}")
            atomic_write_bytes(staging / file_name, data, fsync=self.fsync,
                               crash_point=self._labelled(file_name))
        if self.fsync:
            self._crash("fsync-dir staging")
            fsync_dir(staging)
        return manifest_bytes

    def _labelled(self, file_name: str) -> CrashPoint | None:
        hook = self.crash_point
        return None if hook is None else (lambda step: hook(f"{step} {file_name}"))

    def _undo(self, name: str, txn: int, epoch: int, step: int, staging: Path, final: Path) -> None:
        """Best-effort cleanup after a failed write; never raises (the write error is what matters).
        `final` is this transaction's own new name, never a committed checkpoint's."""
        try:
            self._wal.append(RecordType.ABORT, txn, epoch, step, name.encode())
        except OSError as exc:
            # Advisory only: a BEGIN without COMMIT already reads as "not committed".
            self.events.append(f"{name}: WAL ABORT(txn {txn}) not written: {exc}")
        for path in (staging, final):
            try:
                remove_path(path)
            except OSError as exc:
                self.events.append(f"{path.name}: cleanup after failed write failed: {exc}; recovery will clean it")

    def _retain(self) -> None:
        """Retire what the new COMMIT superseded (it is durable now): an older checkpoint of the same
        step, then the oldest beyond `keep_last` (by txn, so an abandoned branch goes first), except
        the best kept ones. A same-step checkpoint goes even when best: the step was reached again
        after a rollback or branch, so its history was abandoned."""
        newest = self.committed()
        same_step = [c for c in newest[1:] if c.step == newest[0].step]
        others = [c for c in newest if c not in same_step]
        kept_best = {c.name for c in ranked_best(others, self.keep_best)} if self.keep_best else set()
        beyond = [c for c in others[self.keep_last:] if c.name not in kept_best]
        for info in (*same_step, *beyond):
            self._retire(info)
        self._remove_leftovers()
        if self.fsync:
            fsync_dir(self.directory)
        self._wal.prune(min(c.txn_id for c in self.committed()))

    def _retire(self, info: CheckpointInfo) -> None:
        trash = self.directory / f".{info.name}.retired-{info.txn_id}.tmp"
        self._crash(f"rename {info.name} -> {trash.name}")
        info.path.rename(trash)
        del self._committed[info.name]
        self._crash(f"remove {trash.name}")
        remove_path(trash)

    # ------------------------------------------------------------------ startup and writer thread

    def _load_index(self) -> None:
        replayed = replay_wal(self.directory)
        # Manifests count too: a corrupt WAL region may have hidden higher txn ids.
        self._next_txn = max(max((r.txn_id for r in replayed.records), default=0), max_manifest_txn(self.directory)) + 1
        present = {p.name for p in checkpoint_dirs(self.directory)}
        entries = committed_index(replayed.records, self.events)
        self._taken = present | {e.name for e in entries}
        for entry in entries:
            if entry.name in present:
                path = self.directory / entry.name
                self._committed[entry.name] = CheckpointInfo(
                    entry.name, path, entry.txn_id, entry.epoch, entry.step, _size_on_disk(path), entry.best)

    def _remove_leftovers(self) -> None:
        for path in self.directory.iterdir():
            if is_leftover(path):
                remove_path(path)

    def _ensure_writer(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer_loop, name="tolaria-checkpoint-writer", daemon=True)
            self._thread.start()

    def _writer_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                snapshot, best, future = self._pending
                self._pending = None
                self._busy = True
            self._run_one(snapshot, best, future)
            del snapshot  # the store keeps no reference to a written snapshot
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _run_one(self, snapshot: Snapshot, best: BestScore | None, future: Future[CheckpointInfo]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            with self._write_lock:
                future.set_result(self._save(snapshot, best))
        except (CheckpointWriteError, CheckpointStateError) as exc:
            future.set_exception(exc)  # the writer carries on; the caller's breaker decides
        except BaseException as exc:  # noqa: BLE001 - a bug must reach the caller's future, not kill the thread
            future.set_exception(exc)


def _size_on_disk(directory: Path) -> int:
    """Bytes of the regular files in a checkpoint this store did not write, from `lstat` alone:
    nothing is opened or read and no link is followed (the directory may be hostile)."""
    total = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    return total


def _serialize(snapshot: Snapshot) -> dict[str, bytes]:
    """The bytes of model.pt and state.pt; the checksums in the manifest are taken of these same bytes."""
    state = dict(snapshot.state)
    return {MODEL_FILE: dumps_state(state.pop("model", {})), STATE_FILE: dumps_state(state)}

