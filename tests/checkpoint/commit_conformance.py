"""Recovery conformance (c): a crash at every durable step of a checkpoint commit.

`crash_at_every_step(directory, make_snapshot)` runs one save with the store's crash-point hook
copying the directory at each step (what the disk holds if the process died there; page cache
survives a process crash), then recovers every copy. A test for another workload passes its own
`make_snapshot(step) -> Snapshot`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from esper.tolaria.checkpoint import CheckpointStore, recover, verify_checkpoint
from esper.tolaria.checkpoint.recovery import committed_index
from esper.tolaria.checkpoint.wal import replay
from esper.tolaria.state.snapshot import Snapshot, state_checksum

MakeSnapshot = Callable[[int], Snapshot]
BENIGN = ("has no durable COMMIT in the WAL; removed", "torn tail")


@dataclass(frozen=True)
class CrashCase:
    """Steps committed before the save under test, and the step that save writes."""

    before: tuple[int, ...]
    step: int
    keep_last: int = 2


def _valid(directory: Path) -> dict[str, int]:
    """Committed checkpoints that verify: name -> txn."""
    out = {}
    for entry in committed_index(replay(directory).records):
        if verify_checkpoint(directory / entry.name, entry).ok:
            out[entry.name] = entry.txn_id
    return out


def crash_at_every_step(work: Path, make_snapshot: MakeSnapshot, case: CrashCase) -> list[str]:
    """Crash points visited; asserts recovery at each one finds a committed checkpoint and loses none."""
    directory = work / "ckpt"
    store = CheckpointStore(directory, keep_last=case.keep_last)
    for step in case.before:
        store.save(make_snapshot(step))
    committed_before = _valid(directory)
    newest_before = max(committed_before.values())
    copies: list[tuple[str, Path]] = []

    def copy_here(label: str) -> None:
        target = work / f"crash-{len(copies):03d}"
        shutil.copytree(directory, target, symlinks=True)
        copies.append((label, target))

    store.crash_point = copy_here
    snapshot = make_snapshot(case.step)
    info = store.save(snapshot)
    store.crash_point = None
    copy_here("after save returned")
    store.close()
    committed_after = _valid(directory)
    assert info.name in committed_after

    expected_new = state_checksum(snapshot.state)
    for label, copy in copies:
        committed = info.txn_id in {e.txn_id for e in committed_index(replay(copy).records)}
        survivors = committed_after if committed else committed_before
        result = recover(copy)
        where = f"crash before {label!r}"
        assert [e for e in result.events if not any(b in e for b in BENIGN)] == [], where
        loaded = result.checkpoint
        assert loaded is not None, where
        assert loaded.txn_id == (info.txn_id if committed else newest_before), where
        if committed:
            assert state_checksum(loaded.state) == expected_new, where
        assert survivors.items() <= _valid(copy).items(), f"{where}: a committed checkpoint was lost"
        reopened = CheckpointStore(copy, keep_last=case.keep_last)  # and the run can go on writing
        assert reopened.save(make_snapshot(case.step + 1)).txn_id > loaded.txn_id, where
        reopened.close()
    return [label for label, _ in copies]
