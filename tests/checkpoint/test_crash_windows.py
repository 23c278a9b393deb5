"""A kill inside every window of the commit sequence, deterministically.

The SIGKILL torture (test_checkpoint_crash_torture.py, slow) finds what it finds where its random
kills land: halfway through a WAL append, halfway through a data file, across a WAL rotation.
Here each of those windows gets its own kill: the directory is copied at every crash point of a
save, and between two copies the bytes that reached the disk are cut short at chosen offsets
(a torn WAL record; a data file written halfway). Every copy must recover to a committed,
verifying checkpoint, lose no earlier commit, and take the next save.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from ckpt_helpers import make_snapshot

from esper.tolaria.checkpoint import CheckpointStore, recover, verify_checkpoint
from esper.tolaria.checkpoint.recovery import committed_index
from esper.tolaria.checkpoint.wal import HEADER_SIZE, replay, segment_paths
from esper.tolaria.state.snapshot import state_checksum

BENIGN = ("has no durable COMMIT in the WAL; removed", "torn tail")


@dataclass(frozen=True)
class Crash:
    label: str  # the durable step the process was killed in (or just before)
    directory: Path


def _copies_at_every_step(work: Path, store: CheckpointStore, step: int) -> tuple[list[Crash], int]:
    copies: list[Crash] = []

    def copy_here(label: str) -> None:
        target = work / f"copy-{len(copies):03d}"
        shutil.copytree(store.directory, target, symlinks=True)
        copies.append(Crash(f"before {label}", target))

    store.crash_point = copy_here
    info = store.save(make_snapshot(step))
    store.crash_point = None
    copy_here("nothing: the save returned")
    return copies, info.txn_id


def _torn_between(work: Path, before: Crash, after: Crash) -> list[Crash]:
    """`after` with what the step between the two copies appended to the WAL cut short."""
    torn = []
    for segment in segment_paths(after.directory):
        old = before.directory / segment.name
        start = old.stat().st_size if old.exists() else 0
        grown = segment.stat().st_size - start
        for cut in sorted({1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1, grown - 1}):
            if not 0 < cut < grown:
                continue
            target = work / f"{after.directory.name}-{segment.stem}-cut{cut}"
            shutil.copytree(after.directory, target, symlinks=True)
            with (target / segment.name).open("r+b") as f:
                f.truncate(start + cut)
            torn.append(Crash(f"{before.label} -> WAL record torn after {cut} bytes", target))
    return torn


def _half_written(work: Path, crash: Crash) -> list[Crash]:
    """`crash` with every temp data file cut to half its length (killed mid-write)."""
    temps = [p for p in crash.directory.rglob(".*.tmp") if p.is_file()]
    if not temps:
        return []
    target = work / f"{crash.directory.name}-half"
    shutil.copytree(crash.directory, target, symlinks=True)
    for temp in temps:
        moved = target / temp.relative_to(crash.directory)
        moved.write_bytes(moved.read_bytes()[: moved.stat().st_size // 2])
    return [Crash(f"{crash.label} -> mid-write", target)]


def _valid(directory: Path) -> dict[str, int]:
    return {e.name: e.txn_id for e in committed_index(replay(directory).records)
            if verify_checkpoint(directory / e.name, e).ok}


def _kill_in_every_window(tmp_path: Path, *, before: tuple[int, ...], step: int, keep_last: int = 2,
                          wal_max_bytes: int = 16 * 1024 * 1024) -> list[str]:
    directory = tmp_path / "ckpt"
    store = CheckpointStore(directory, keep_last=keep_last, wal_max_bytes=wal_max_bytes)
    for s in before:
        store.save(make_snapshot(s))
    committed_before = _valid(directory)
    copies, txn = _copies_at_every_step(tmp_path, store, step)
    store.close()
    committed_after = _valid(directory)
    crashes = list(copies)
    for earlier, later in zip(copies, copies[1:], strict=False):
        crashes += _torn_between(tmp_path, earlier, later)
    for crash in copies:
        crashes += _half_written(tmp_path, crash)
    expected = state_checksum(make_snapshot(step).state)
    for crash in crashes:
        committed = txn in {e.txn_id for e in committed_index(replay(crash.directory).records)}
        result = recover(crash.directory)
        assert [e for e in result.events if not any(b in e for b in BENIGN)] == [], crash.label
        assert result.checkpoint is not None, crash.label
        if committed:
            assert result.checkpoint.txn_id == txn and state_checksum(result.checkpoint.state) == expected, crash.label
        else:
            assert result.checkpoint.txn_id == max(committed_before.values()), crash.label
        survivors = committed_after if committed else committed_before
        assert survivors.items() <= _valid(crash.directory).items(), f"{crash.label}: a committed checkpoint was lost"
        reopened = CheckpointStore(crash.directory, keep_last=keep_last, wal_max_bytes=wal_max_bytes)
        assert reopened.save(make_snapshot(step + 1)).txn_id > result.checkpoint.txn_id, crash.label
        reopened.close()
    return [c.label for c in crashes]


def test_a_kill_inside_every_window_of_a_commit_loses_nothing(tmp_path: Path) -> None:
    labels = _kill_in_every_window(tmp_path, before=(10, 20), step=30)
    assert any("WAL record torn" in label and "BEGIN" in label for label in labels)
    assert any("WAL record torn" in label and "COMMIT" in label for label in labels)
    assert any("mid-write" in label for label in labels)


def test_a_kill_inside_every_window_of_a_recommit_of_the_same_step_loses_nothing(tmp_path: Path) -> None:
    _kill_in_every_window(tmp_path, before=(10, 20, 30), step=20)


@pytest.mark.parametrize("records_per_segment", [1, 3])
def test_a_kill_inside_every_window_across_wal_rotation_and_pruning_loses_nothing(
    tmp_path: Path, records_per_segment: int
) -> None:
    # the records of one commit are about 60-130 bytes: small segments rotate inside the commit
    _kill_in_every_window(tmp_path, before=(10, 20, 30), step=40, keep_last=1,
                          wal_max_bytes=HEADER_SIZE + 100 * records_per_segment)
