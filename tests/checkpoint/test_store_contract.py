"""The checkpoint store's contract beyond the commit order: what a failed write reports, what the
journal records carry, what the manifest says, and how the writer thread ends."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest
from ckpt_helpers import make_snapshot

import esper.tolaria.checkpoint.store as store_module
from esper.leyline import CheckpointManifest, noop_command
from esper.tolaria.checkpoint import BestScore, CheckpointStore, CheckpointWriteError, RecordType, recover
from esper.tolaria.checkpoint.wal import WriteAheadLog, replay
from esper.tolaria.state.snapshot import Snapshot


def _full_disk(name: str) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_names_its_checkpoint_and_keeps_its_cause(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False, fault=_full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        store.save(make_snapshot(10))
    store.close()
    error = info.value
    assert error.checkpoint == "ckpt-000000000010" and error.errno == errno.ENOSPC
    assert isinstance(error.cause, OSError) and error.cause.errno == errno.ENOSPC and error.__cause__ is error.cause
    abort = [r for r in replay(tmp_path).records if r.type == RecordType.ABORT]
    assert [(r.txn_id, r.payload) for r in abort] == [(1, b"ckpt-000000000010")]


def test_another_io_error_says_to_check_the_disk(tmp_path: Path) -> None:
    def broken(name: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    store = CheckpointStore(tmp_path, fsync=False, fault=broken)
    with pytest.raises(CheckpointWriteError, match="previous checkpoints are intact; check the disk"):
        store.save(make_snapshot(10))
    store.close()


def test_an_abort_that_cannot_be_logged_is_reported_and_the_write_error_still_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path, fsync=False, fault=_full_disk)
    real_append = WriteAheadLog.append

    def append(wal: WriteAheadLog, rtype: RecordType, *args: object) -> object:
        if rtype == RecordType.ABORT:
            raise OSError(errno.EIO, "the log device went away")
        return real_append(wal, rtype, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(WriteAheadLog, "append", append)
    with pytest.raises(CheckpointWriteError, match="No space left"):
        store.save(make_snapshot(10))
    assert list(store.events) == ["ckpt-000000000010: WAL ABORT(txn 1) not written: [Errno 5] the log device went away"]
    store.close()


def test_a_cleanup_that_fails_after_a_failed_write_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path, fsync=False, fault=_full_disk)

    def remove_path(path: Path) -> None:
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(store_module, "remove_path", remove_path)
    with pytest.raises(CheckpointWriteError):
        store.save(make_snapshot(10))
    monkeypatch.undo()
    assert list(store.events) == [
        ".ckpt-000000000010.1.tmp: cleanup after failed write failed: [Errno 16] Device or resource busy; "
        "recovery will clean it",
        "ckpt-000000000010: cleanup after failed write failed: [Errno 16] Device or resource busy; "
        "recovery will clean it",
    ]
    store.close()


def test_the_manifest_names_the_checkpoint_the_run_and_its_config(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False, run_id="run-7", config_sha256="c0ffee", world_size=4)
    info = store.save(make_snapshot(20, epoch=2))
    store.close()
    manifest = CheckpointManifest.FromString((info.path / "manifest.pb").read_bytes())
    assert (manifest.checkpoint_id, manifest.txn_id, manifest.epoch, manifest.global_step) == (info.name, 1, 2, 20)
    assert (manifest.run_id, manifest.config_sha256, manifest.world_size) == ("run-7", "c0ffee", 4)
    assert manifest.HasField("created_at") and manifest.created_at.seconds > 0


def test_journal_records_belong_to_the_latest_transaction(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    store.journal_command(noop_command(issued_by="t", reason="before any checkpoint"), epoch=0, step=0)
    store.save(make_snapshot(10))
    store.save(make_snapshot(20))
    store.journal_command(noop_command(issued_by="t", reason="after two"), epoch=2, step=21)
    store.journal_rewind(epoch=1, step=10, reason="fast rollback to snap-10")
    store.close()
    journal = [(r.type, r.txn_id, r.epoch, r.step) for r in replay(tmp_path).records
               if r.type in (RecordType.COMMAND, RecordType.REWIND)]
    assert journal == [(RecordType.COMMAND, 0, 0, 0), (RecordType.COMMAND, 2, 2, 21), (RecordType.REWIND, 2, 1, 10)]
    rewind = [r for r in replay(tmp_path).records if r.type == RecordType.REWIND]
    assert rewind[0].payload == b"fast rollback to snap-10"


def test_a_rewind_reason_is_kept_to_its_first_4096_bytes(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    store.journal_rewind(epoch=0, step=0, reason="r" * 5000)
    store.close()
    (rewind,) = [r for r in replay(tmp_path).records if r.type == RecordType.REWIND]
    assert rewind.payload == b"r" * 4096


def test_an_empty_store_has_no_latest_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    assert store.latest() is None and store.committed() == []
    store.close()


def test_close_reports_whether_the_queued_writes_finished(tmp_path: Path) -> None:
    release = threading.Event()
    store = CheckpointStore(tmp_path, fsync=False, fault=lambda name: release.wait(10) and None)
    store.save_async(make_snapshot(10))
    assert store.close(timeout=0.05) is False  # the write is still blocked
    release.set()
    idle = CheckpointStore(tmp_path / "idle", fsync=False)
    assert idle.close(timeout=5) is True


def test_the_writer_is_one_named_daemon_thread_so_an_unclosed_store_never_blocks_exit(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    store.save_async(make_snapshot(10)).result(10)
    writers = [t for t in threading.enumerate() if t.name == "tolaria-checkpoint-writer"]
    assert len(writers) >= 1 and all(t.daemon for t in writers)
    store.close()


def test_a_bug_in_an_async_write_reaches_its_future_and_the_writer_carries_on(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    broken = make_snapshot(10)

    def not_ready() -> None:
        raise RuntimeError("a copy engine bug")

    broken.wait_ready = not_ready  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a copy engine bug"):
        store.save_async(broken).result(10)
    assert store.save_async(make_snapshot(20)).result(10).step == 20
    store.close()


def test_a_default_store_writes_for_one_process_and_starts_without_an_error(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    assert store.last_error is None
    info = store.save(make_snapshot(10))
    assert store.last_error is None
    store.close()
    assert CheckpointManifest.FromString((info.path / "manifest.pb").read_bytes()).world_size == 1


def test_keeping_no_checkpoint_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last=0: keep at least 1 committed checkpoint"):
        CheckpointStore(tmp_path, keep_last=0)


def test_a_checkpoint_reports_the_bytes_it_wrote(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    info = store.save(make_snapshot(10))
    store.close()
    assert info.size_bytes == sum(p.stat().st_size for p in info.path.iterdir())


def test_a_retired_checkpoints_name_is_never_reused_in_the_same_store(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False, keep_last=1)
    store.save(make_snapshot(10))
    store.save(make_snapshot(20))  # retires ckpt-000000000010: its directory is gone, its name taken
    again = store.save(make_snapshot(10))  # step 10 reached again after a rollback
    store.close()
    assert again.name == "ckpt-000000000010.t3"


def test_a_bug_mid_write_aborts_the_transaction_and_leaves_no_directory(tmp_path: Path) -> None:
    class InjectedFault(Exception):
        pass

    def fault(label: str) -> None:
        if label.startswith("rename .ckpt-"):
            raise InjectedFault(label)

    store = CheckpointStore(tmp_path, fsync=False, crash_point=fault)
    with pytest.raises(InjectedFault):
        store.save(make_snapshot(30, epoch=3))
    store.close()
    assert [(r.type, r.txn_id, r.epoch, r.step, r.payload) for r in replay(tmp_path).records] == [
        (RecordType.BEGIN, 1, 3, 30, b"ckpt-000000000030"), (RecordType.ABORT, 1, 3, 30, b"ckpt-000000000030")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wal-000001.log"]


def test_a_snapshot_without_a_model_section_saves_an_empty_model(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    store.save(Snapshot(snapshot_id="s", epoch=0, global_step=5, state={"trainer": {"step": 5}}))
    store.close()
    result = recover(tmp_path)
    assert result.checkpoint is not None and result.checkpoint.state["model"] == {}


def test_store_events_keep_the_newest_hundred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path, fsync=False, fault=_full_disk)

    def remove_path(path: Path) -> None:
        raise OSError(errno.EBUSY, "busy")

    monkeypatch.setattr(store_module, "remove_path", remove_path)
    for step in range(51):  # two events per failed write
        with pytest.raises(CheckpointWriteError):
            store.save(make_snapshot(step))
    monkeypatch.undo()
    assert len(store.events) == 100 and store.events[0].startswith(".ckpt-000000000001.2.tmp")
    store.close()


def test_close_does_not_wait_for_a_stuck_write_past_its_timeout(tmp_path: Path) -> None:
    release, returned = threading.Event(), threading.Event()

    def stuck(name: str) -> None:
        release.wait(30)
        returned.set()

    store = CheckpointStore(tmp_path, fsync=False, fault=stuck)
    store.save_async(make_snapshot(10))
    assert store.close(timeout=0.05) is False
    assert not returned.is_set()  # close gave up on the writer instead of joining it
    release.set()


def test_a_store_keeps_its_own_number_of_best_and_an_async_save_keeps_its_score(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False, keep_last=1, keep_best=2)
    for step, value in ((10, 0.9), (20, 0.8)):
        store.save(make_snapshot(step), BestScore("accuracy", "max", value, step // 10, 1))
    store.save_async(make_snapshot(30), BestScore("accuracy", "max", 0.95, 3, 1)).result(10)
    assert [c.step for c in store.best()] == [30, 10]  # keep_best=2 wins over the score's top_k=1
    assert sorted(int(p.name[5:17]) for p in tmp_path.glob("ckpt-*")) == [10, 30]
    store.close()


def test_a_default_store_keeps_three_and_names_no_run(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    infos = [store.save(make_snapshot(step, epoch=step // 10)) for step in (10, 20, 30, 40)]
    store.close()
    assert [c.step for c in store.committed()] == [40, 30, 20] and infos[-1].epoch == 4
    manifest = CheckpointManifest.FromString((infos[-1].path / "manifest.pb").read_bytes())
    assert (manifest.run_id, manifest.config_sha256) == ("", "")


def test_a_reopened_store_knows_its_checkpoints_epochs_and_taken_names(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False, keep_last=1)
    store.save(make_snapshot(10, epoch=1))
    store.save(make_snapshot(20, epoch=2))  # retires step 10; its name stays taken in the WAL
    store.close()
    (tmp_path / ".ckpt-000000000030.9.tmp").mkdir()  # a leftover of a killed write
    reopened = CheckpointStore(tmp_path, fsync=False, keep_last=1)
    assert not (tmp_path / ".ckpt-000000000030.9.tmp").exists()
    latest = reopened.latest()
    assert latest is not None and (latest.name, latest.epoch, latest.step) == ("ckpt-000000000020", 2, 20)
    assert reopened.save(make_snapshot(10, epoch=1)).name == "ckpt-000000000010.t3"
    reopened.close()
