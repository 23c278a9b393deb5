"""Async saves: one writer thread, newest-wins queue, no reference to live objects."""

from __future__ import annotations

import errno
import gc
import threading
import weakref
from concurrent.futures import CancelledError
from pathlib import Path

import pytest
import torch
from ckpt_helpers import make_snapshot

from esper.tolaria.checkpoint import CheckpointStore, CheckpointSuperseded, CheckpointWriteError, recover
from esper.tolaria.state.snapshot import Snapshot, deep_clone


class _Gate:
    """A fault hook that blocks the writer at its first file until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, name: str) -> None:
        self.entered.set()
        if not self.release.wait(10):
            raise TimeoutError("test gate never released")


def test_mutating_live_tensors_after_handoff_does_not_change_checkpoint(tmp_path: Path) -> None:
    gate = _Gate()
    store = CheckpointStore(tmp_path, fsync=False, fault=gate)
    live = {"model": {"w": torch.ones(4, 4)}, "trainer": {"steps": [1, 2]}}
    future = store.save_async(Snapshot("s", 1, 10, deep_clone(live)))
    assert gate.entered.wait(10)
    live["model"]["w"].add_(100.0)  # the next optimizer step, while the writer is mid-write
    live["trainer"]["steps"].append(3)
    gate.release.set()
    future.result(timeout=10)
    store.close()
    loaded = recover(tmp_path).checkpoint
    assert loaded is not None
    assert torch.equal(loaded.state["model"]["w"], torch.ones(4, 4))
    assert loaded.state["trainer"]["steps"] == [1, 2]


def test_store_keeps_no_reference_to_a_written_snapshot(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    snap = make_snapshot(10)
    tensor_ref = weakref.ref(snap.state["model"]["fc.weight"])
    snap_ref = weakref.ref(snap)
    store.save_async(snap).result(timeout=10)
    assert store.flush(10)
    del snap
    gc.collect()
    assert snap_ref() is None and tensor_ref() is None
    store.close()


def test_writes_run_on_one_long_lived_thread(tmp_path: Path) -> None:
    seen: set[int] = set()
    store = CheckpointStore(tmp_path, fsync=False, fault=lambda name: seen.add(threading.get_ident()))
    for step in (10, 20, 30):
        store.save_async(make_snapshot(step)).result(timeout=10)
    assert len(seen) == 1 and threading.get_ident() not in seen
    store.close()
    assert not any(t.name == "tolaria-checkpoint-writer" and t.is_alive() for t in threading.enumerate()
                   if t.ident in seen)


def test_newest_queued_request_wins_and_older_is_superseded(tmp_path: Path) -> None:
    gate = _Gate()
    store = CheckpointStore(tmp_path, fsync=False, fault=gate)
    running = store.save_async(make_snapshot(10))
    assert gate.entered.wait(10)
    queued = store.save_async(make_snapshot(20))
    newest = store.save_async(make_snapshot(30))
    with pytest.raises(CheckpointSuperseded, match="step 30"):
        queued.result(timeout=1)
    gate.release.set()
    assert running.result(timeout=10).step == 10
    assert newest.result(timeout=10).step == 30
    store.close()
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000000000010", "ckpt-000000000030"]


def test_async_disk_full_reaches_the_future_and_writer_carries_on(tmp_path: Path) -> None:
    def fault(name: str) -> None:
        if "000000000020" in name:
            raise OSError(errno.ENOSPC, "No space left on device")

    store = CheckpointStore(tmp_path, fsync=False, fault=fault)
    store.save_async(make_snapshot(10)).result(timeout=10)
    with pytest.raises(CheckpointWriteError):
        store.save_async(make_snapshot(20)).result(timeout=10)
    assert store.save_async(make_snapshot(30)).result(timeout=10).step == 30
    store.close()


def test_flush_times_out_while_writer_is_blocked(tmp_path: Path) -> None:
    gate = _Gate()
    store = CheckpointStore(tmp_path, fsync=False, fault=gate)
    store.save_async(make_snapshot(10))
    assert gate.entered.wait(10)
    assert store.flush(timeout=0.05) is False
    gate.release.set()
    assert store.flush(timeout=10) is True
    store.close()


def test_closed_store_refuses_new_saves(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.save_async(make_snapshot(10))
    with pytest.raises(ValueError, match="closed"):
        store.save(make_snapshot(10))


def test_cancelled_future_is_skipped(tmp_path: Path) -> None:
    gate = _Gate()
    store = CheckpointStore(tmp_path, fsync=False, fault=gate)
    store.save_async(make_snapshot(10))
    assert gate.entered.wait(10)
    queued = store.save_async(make_snapshot(20))
    assert queued.cancel()
    gate.release.set()
    assert store.flush(10)
    with pytest.raises(CancelledError):
        queued.result()
    store.close()
    assert [p.name for p in tmp_path.glob("ckpt-*")] == ["ckpt-000000000010"]
