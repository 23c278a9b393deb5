"""A crash at any step of a commit never loses a committed checkpoint (issue items 2 and (c)).

Two ways to crash: the directory as it stands at each step (a killed process), and an OSError
raised at each step (the store cleans up after itself, which must not touch committed data).
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from ckpt_helpers import make_snapshot
from commit_conformance import CrashCase, crash_at_every_step

from esper.tolaria.checkpoint import CheckpointStore, CheckpointWriteError, recover

RECOMMIT = CrashCase(before=(10, 20, 30), step=20)  # a step reached again after a rollback
FRESH = CrashCase(before=(10, 20), step=30)  # the ordinary path, retention included


@pytest.mark.parametrize("case", [RECOMMIT, FRESH], ids=["recommit-same-step", "new-step"])
def test_a_crash_at_every_commit_step_recovers_a_committed_checkpoint_and_loses_none(
    tmp_path: Path, case: CrashCase
) -> None:
    labels = crash_at_every_step(tmp_path, make_snapshot, case)
    for kind in ("wal-append BEGIN", "write model.pt", "fsync state.pt", "rename manifest.pb",
                 "fsync-dir staging", "fsync-dir root", "wal-append COMMIT"):
        assert kind in labels, (kind, labels)  # every kind of durable step was crashed at
    assert any(label.startswith("remove .ckpt-") for label in labels)  # and retiring the superseded one


def _labels(case: CrashCase, tmp_path: Path) -> list[str]:
    seen: list[str] = []
    store = CheckpointStore(tmp_path / "probe", keep_last=case.keep_last, crash_point=seen.append)
    for step in (*case.before, case.step):
        seen.clear()
        store.save(make_snapshot(step))
    store.close()
    return list(seen)


@pytest.mark.parametrize("case", [RECOMMIT, FRESH], ids=["recommit-same-step", "new-step"])
def test_an_io_error_at_every_commit_step_keeps_the_committed_checkpoints(tmp_path: Path, case: CrashCase) -> None:
    labels = _labels(case, tmp_path)
    commit_at = labels.index("wal-append COMMIT")
    for i, label in enumerate(labels):
        directory = tmp_path / f"run-{i}"
        store = CheckpointStore(directory, keep_last=case.keep_last)
        for step in case.before:
            store.save(make_snapshot(step))
        newest = store.latest()
        assert newest is not None

        def fail(at: str, label: str = label) -> None:
            if at == label:
                raise OSError(errno.EIO, f"injected I/O error at {at}")

        store.crash_point = fail
        if i <= commit_at:  # before the COMMIT is durable: the write fails, nothing committed moves
            with pytest.raises(CheckpointWriteError, match="injected I/O error"):
                store.save(make_snapshot(case.step))
            expected = newest.txn_id
        else:  # retiring the superseded one failed: the new checkpoint is committed all the same
            expected = store.save(make_snapshot(case.step)).txn_id
            assert any("injected I/O error" in e for e in store.events), label
        store.close()
        result = recover(directory)
        assert result.checkpoint is not None and result.checkpoint.txn_id == expected, label
        assert all("corrupt" not in e and "mismatch" not in e for e in result.events), (label, result.events)
