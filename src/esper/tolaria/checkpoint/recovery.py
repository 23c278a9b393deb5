"""Recovery: find the newest committed, checksum-valid checkpoint and load it.

Trust rules: a checkpoint counts only if the WAL holds a readable COMMIT for it whose txn id
matches its manifest and whose manifest sha256 matches manifest.pb, and every file's size and
CRC32C (sha256 in older manifests) match the manifest. Files are checksummed through a memory
map and loaded from the same, never rewritten, file.
Anything else is reported as an event naming the file, and recovery falls back to the next
older committed checkpoint.
"""

from __future__ import annotations

import mmap
import os
import pickle
from collections.abc import MutableSequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from esper.leyline import CheckpointFile, CheckpointManifest
from esper.tolaria.checkpoint.best import BEST, BestScore, ranked_best
from esper.tolaria.checkpoint.layout import (
    DATA_FILES,
    FILE_NAME_RE,
    MANIFEST_FILE,
    MAX_DATA_FILE_BYTES,
    MAX_MANIFEST_BYTES,
    MODEL_FILE,
    STATE_FILE,
    CommitInfo,
    UnsafeFileError,
    crc32c_of,
    decode_commit,
    is_checkpoint_name,
    is_leftover,
    is_real_dir,
    load_state_file,
    open_regular,
    read_regular,
    remove_path,
    sha256_hex,
)
from esper.tolaria.checkpoint.wal import RecordType, WalRecord, replay
from esper.tolaria.state.snapshot import Snapshot


class CheckpointNotFound(FileNotFoundError):
    """No committed, valid checkpoint (or not the one asked for) exists in a directory."""


@dataclass(frozen=True)
class CommitEntry:
    name: str
    txn_id: int
    epoch: int
    step: int
    manifest_sha256: str
    best: BestScore | None = None  # the score `checkpoint.keep_best` gave it, if any


@dataclass
class Verification:
    """Result of checking one checkpoint directory. `problem` names the file first."""

    ok: bool
    problem: str = ""
    manifest: CheckpointManifest | None = None


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint, its sections merged back into one state dict (`model` included)."""

    name: str
    path: Path
    txn_id: int
    epoch: int
    step: int
    state: dict[str, Any]
    manifest: CheckpointManifest

    def snapshot(self) -> Snapshot:
        # The files' sizes stand in for the tensor bytes: walking the whole state again costs ms.
        size = sum(f.size_bytes for f in self.manifest.files) or 1
        return Snapshot(snapshot_id=self.name, epoch=self.epoch, global_step=self.step, state=self.state,
                        healthy=True, nbytes=size)


@dataclass
class RecoveryResult:
    checkpoint: LoadedCheckpoint | None
    events: list[str] = field(default_factory=list)
    # COMMAND records applied after the checkpoint on the history that continued from it (see
    # `journaled_commands`); empty when a checkpoint was asked for by name (a branch).
    commands: list[WalRecord] = field(default_factory=list)


def committed_index(records: list[WalRecord], events: MutableSequence[str] | None = None) -> list[CommitEntry]:
    """One entry per checkpoint name: its latest readable COMMIT, newest transaction first.
    A COMMIT naming something that is not a checkpoint name is skipped (and reported in `events`)."""
    latest: dict[str, CommitEntry] = {}
    for rec in records:
        if rec.type != RecordType.COMMIT:
            continue
        try:
            info = decode_commit(rec.payload)
        except UnsafeFileError as exc:
            if events is not None:
                events.append(f"{rec.segment} offset {rec.offset}: {exc}; ignored (the WAL was damaged or forged)")
            continue
        if info is not None and (info.name not in latest or rec.txn_id > latest[info.name].txn_id):
            latest[info.name] = CommitEntry(info.name, rec.txn_id, rec.epoch, rec.step, info.manifest_sha256,
                                            info.best)
    return sorted(latest.values(), key=lambda e: e.txn_id, reverse=True)


def journaled_commands(records: list[WalRecord], after_step: int) -> list[WalRecord]:
    """The COMMAND records of the current history with a step past `after_step`, oldest first.

    Along one history, commands are journaled at increasing steps. A REWIND(step r) (a rollback
    or a branch) drops the commands after r: they were applied on a history that was abandoned.
    A command journaled at a step that already has one (or a later one) also reveals a rewind.
    A checkpoint at step s already holds the command applied at s (snapshots follow the apply)."""
    live: list[WalRecord] = []
    for rec in records:
        if rec.type == RecordType.COMMAND:
            live = [c for c in live if c.step < rec.step]
            live.append(rec)
        elif rec.type == RecordType.REWIND:
            live = [c for c in live if c.step <= rec.step]
    return [c for c in live if c.step > after_step]


def max_manifest_txn(directory: Path) -> int:
    """Highest txn id named by any parseable manifest under `directory` (0 if none)."""
    best = 0
    for path in checkpoint_dirs(directory):
        manifest = _parse_manifest(path / MANIFEST_FILE)
        if manifest is not None:
            best = max(best, manifest.txn_id)
    return best


def verify_checkpoint(path: str | os.PathLike[str], commit: CommitEntry | CommitInfo | None = None) -> Verification:
    """Check one checkpoint directory against its manifest (and, if given, its WAL COMMIT)."""
    root = Path(path)
    if not is_real_dir(root):
        return Verification(False, "is not a directory (a link or a file stands in its place)")
    checked = _checked_manifest(root, commit)
    if not checked.ok:
        return checked
    for entry in checked.manifest.files:  # type: ignore[union-attr]
        problem = _check_mapped(root / entry.name, entry)  # names were validated with the manifest
        if problem:
            return Verification(False, f"{entry.name} {problem}", checked.manifest)
    return Verification(True, "", checked.manifest)


def _checked_manifest(root: Path, commit: CommitEntry | CommitInfo | None) -> Verification:
    """The manifest, checked against its COMMIT and for the files it must list (no data read yet)."""
    try:
        manifest_bytes = read_regular(root / MANIFEST_FILE, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return Verification(False, f"{MANIFEST_FILE} missing")
    except UnsafeFileError as exc:
        return Verification(False, f"{MANIFEST_FILE} {exc.problem}")
    if commit is not None and sha256_hex(manifest_bytes) != commit.manifest_sha256:
        return Verification(False, f"{MANIFEST_FILE} sha256 mismatch with its WAL COMMIT")
    manifest = CheckpointManifest()
    try:
        manifest.ParseFromString(manifest_bytes)
    except DecodeError as exc:
        return Verification(False, f"{MANIFEST_FILE} does not parse: {exc}")
    if isinstance(commit, CommitEntry) and manifest.txn_id != commit.txn_id:
        return Verification(False, f"{MANIFEST_FILE} txn {manifest.txn_id} has no durable COMMIT "
                                   f"(the WAL commits txn {commit.txn_id} for this name)")
    if (problem := _files_problem(manifest)):
        return Verification(False, f"{MANIFEST_FILE} {problem}", manifest)
    listed = {f.name for f in manifest.files}
    if not set(DATA_FILES) <= listed:
        missing = sorted(set(DATA_FILES) - listed)
        return Verification(False, f"{MANIFEST_FILE} lists {sorted(listed)}, missing {missing}", manifest)
    return Verification(True, "", manifest)


def _files_problem(manifest: CheckpointManifest) -> str:
    """Why the manifest's file list cannot be trusted, or "": every name one plain file name in
    the checkpoint directory (no separator, no "..", not absolute), listed once, of a sane size."""
    seen: set[str] = set()
    for f in manifest.files:
        if not FILE_NAME_RE.match(f.name) or f.name == MANIFEST_FILE:
            return f"lists the file name {f.name[:80]!r}, which is not a checkpoint file name (refused)"
        if f.name in seen:
            return f"lists {f.name!r} twice"
        if f.size_bytes > MAX_DATA_FILE_BYTES:
            return f"declares {f.name} as {f.size_bytes} bytes, over the {MAX_DATA_FILE_BYTES}-byte limit"
        seen.add(f.name)
    return ""


def verify_and_load(path: Path, entry: CommitEntry) -> LoadedCheckpoint | Verification:
    """Verify every file's size and checksum, then load it, without copying its bytes.

    Each file is checksummed through a read-only memory map and then loaded with
    `torch.load(mmap=True)`, so tensors are backed by the page cache (copy-on-write) instead of
    being read into a buffer and copied again into storages: about 3 ms less for a 12 MB
    checkpoint, a quarter of the load. Committed files are never rewritten, so the bytes
    checked are the bytes loaded. Returns the loaded checkpoint, or the failed `Verification`
    naming the file and problem."""
    checked = verify_checkpoint(path, entry)
    if not checked.ok:
        return checked
    manifest = checked.manifest
    assert manifest is not None  # ok implies a parsed manifest
    sections: dict[str, Any] = {}
    for file_name in (STATE_FILE, MODEL_FILE):
        try:
            sections[file_name] = load_state_file(path / file_name)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            return Verification(False, f"{file_name} does not load: {exc}", manifest)
    state = dict(sections[STATE_FILE])
    state["model"] = sections[MODEL_FILE]
    return LoadedCheckpoint(path.name, path, entry.txn_id, entry.epoch, entry.step, state, manifest)


def _check_mapped(path: Path, entry: CheckpointFile) -> str:
    """"" if the file matches its manifest entry (size, then checksum over a memory map), else
    what is wrong."""
    try:
        fd = open_regular(path, MAX_DATA_FILE_BYTES)
    except FileNotFoundError:
        return "missing"
    except UnsafeFileError as exc:
        return exc.problem
    try:
        size = os.fstat(fd).st_size
        if size != entry.size_bytes:  # checked before a byte is read: a huge sparse file costs nothing
            return f"size {size} bytes, manifest says {entry.size_bytes} (truncated or extended)"
        if size == 0:
            return ""
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
            if entry.sha256:  # written before files carried a CRC32C
                return "sha256 mismatch" if sha256_hex(view) != entry.sha256 else ""
            return "crc32c mismatch" if crc32c_of(view) != entry.crc32c else ""
    finally:
        os.close(fd)


def recover(directory: str | os.PathLike[str], *, clean: bool = True, name: str | None = None,
            before_epoch: int | None = None) -> RecoveryResult:
    """Load the newest valid committed checkpoint under `directory` (the highest committed txn),
    or with `name` exactly that one (raises CheckpointNotFound naming those that exist); `name`
    "best" is the best kept checkpoint (`checkpoint.keep_best`) that verifies. With `before_epoch`,
    the newest of those that resume before that epoch (a state from before a given boundary).

    `events` holds a sentence for every WAL problem and for every newer checkpoint passed over
    (corrupt file, missing, uncommitted). With `clean`, temp leftovers are removed, and so are
    checkpoint dirs that no COMMIT names, unless the WAL is corrupt (then a dir may have lost its
    COMMIT to the damage and is kept as evidence). A dir that a COMMIT names is never removed.
    """
    root = Path(directory)
    replayed = replay(root)
    events = list(replayed.events)
    entries = committed_index(replayed.records, events)
    present = {p.name for p in checkpoint_dirs(root)}
    chosen: LoadedCheckpoint | None
    failures: list[str] = []
    if name == BEST:
        chosen, failures = _load_best(root, entries, present)
    elif name is not None:
        chosen = _load_named(root, name, entries, present)
    else:
        older = [e for e in entries if before_epoch is None or e.epoch < before_epoch]
        chosen, failures = _load_newest(root, older, present)
    target = f"fell back to {chosen.name}" if chosen else "no valid committed checkpoint left"
    events += [f"{f}; {target}" for f in failures]
    committed_names = {e.name for e in entries}
    events += _clean(root, present - committed_names, clean=clean, keep_uncommitted=bool(replayed.corruptions))
    commands = journaled_commands(replayed.records, chosen.step) if chosen is not None and name is None else []
    return RecoveryResult(chosen, events, commands)


def _load_newest(root: Path, entries: list[CommitEntry],
                 present: set[str]) -> tuple[LoadedCheckpoint | None, list[str]]:
    failures: list[str] = []
    newest_present = max((e.txn_id for e in entries if e.name in present), default=-1)
    for entry in entries:
        if entry.name not in present:
            if entry.txn_id > newest_present:
                failures.append(f"{entry.name} committed in the WAL but missing on disk")
            continue  # older ones were deleted by retention
        result = verify_and_load(root / entry.name, entry)
        if isinstance(result, LoadedCheckpoint):
            return result, failures
        failures.append(f"{entry.name}/{result.problem}")
    return None, failures


def _load_named(root: Path, name: str, entries: list[CommitEntry], present: set[str]) -> LoadedCheckpoint:
    available = [e.name for e in entries if e.name in present]
    listing = ", ".join(available) or "none"
    entry = next((e for e in entries if e.name == name and name in present), None)
    if entry is None:
        raise CheckpointNotFound(f"{name!r} is not a committed checkpoint in {root}; committed checkpoints: "
                                 f"{listing} (see `tolaria inspect {root}`)")
    result = verify_and_load(root / name, entry)
    if not isinstance(result, LoadedCheckpoint):
        others = ", ".join(n for n in available if n != name) or "none"
        raise CheckpointNotFound(f"{name} does not verify: {name}/{result.problem}; other committed checkpoints: "
                                 f"{others}")
    return result


def _load_best(root: Path, entries: list[CommitEntry], present: set[str]) -> tuple[LoadedCheckpoint, list[str]]:
    """The best kept checkpoint that verifies (a corrupt best one is passed over, and said so)."""
    kept = ranked_best([e for e in entries if e.name in present])
    if not kept:
        raise CheckpointNotFound(
            f"--from best: no checkpoint in {root} is kept as best (none carries a keep_best score); set "
            "checkpoint.keep_best = {top_k = 1} in the config (`--set checkpoint.keep_best.top_k=1`) so runs keep "
            f"their best checkpoint, or name one of those `tolaria inspect {root}` lists")
    failures: list[str] = []
    for entry in kept:
        result = verify_and_load(root / entry.name, entry)
        if isinstance(result, LoadedCheckpoint):
            return result, failures
        failures.append(f"best checkpoint {entry.name}/{result.problem}")
    raise CheckpointNotFound(f"--from best: no best checkpoint verifies: {'; '.join(failures)}")


def load_for_rollback(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The state dict of the newest valid committed checkpoint (for a full rollback).

    Raises CheckpointNotFound naming what was wrong with each candidate."""
    result = recover(directory, clean=False)
    if result.checkpoint is None:
        raise CheckpointNotFound(f"no valid committed checkpoint in {directory}: {'; '.join(result.events) or 'empty'}")
    return result.checkpoint.state


def _clean(root: Path, uncommitted: set[str], *, clean: bool, keep_uncommitted: bool) -> list[str]:
    events = []
    for name in sorted(uncommitted):
        if not clean or keep_uncommitted:
            events.append(f"{name} has no durable COMMIT in the WAL; ignored and kept")
            continue
        remove_path(root / name)
        events.append(f"{name} has no durable COMMIT in the WAL; removed")
    if clean and root.is_dir():
        for path in root.iterdir():
            if is_leftover(path):
                remove_path(path)
    return events


def checkpoint_dirs(root: Path) -> list[Path]:
    """The checkpoint directories under `root` (real directories with a checkpoint name, links excluded)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if is_checkpoint_name(p.name) and is_real_dir(p))


def _parse_manifest(path: Path) -> CheckpointManifest | None:
    manifest = CheckpointManifest()
    try:
        manifest.ParseFromString(read_regular(path, MAX_MANIFEST_BYTES))
    except (FileNotFoundError, NotADirectoryError, UnsafeFileError, DecodeError):
        return None
    return manifest
