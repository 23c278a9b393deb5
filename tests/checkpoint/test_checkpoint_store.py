"""CheckpointStore: round trip, disk-full, retention, same-step supersede, journaled commands."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from ckpt_helpers import assert_state_equal, make_snapshot, make_state

from esper.leyline import SEED_OP_GERMINATE, CheckpointManifest, parse, seed_command
from esper.tolaria.checkpoint import CheckpointStateError, CheckpointStore, CheckpointWriteError, inspect, recover
from esper.tolaria.checkpoint.wal import RecordType, replay


def test_save_then_recover_returns_equal_nested_state(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    snap = make_snapshot(120, epoch=12)
    info = store.save(snap)
    store.close()
    assert info.name == "ckpt-000000000120" and (tmp_path / info.name / "model.pt").is_file()
    result = recover(tmp_path)
    assert result.events == []
    loaded = result.checkpoint
    assert loaded is not None and (loaded.epoch, loaded.step, loaded.txn_id) == (12, 120, info.txn_id)
    expected = {**{k: v for k, v in snap.state.items() if k != "model"}, "model": snap.state["model"]}
    assert_state_equal(loaded.state, expected)
    assert loaded.snapshot().global_step == 120


def test_manifest_lists_each_file_with_size_and_crc32c(tmp_path: Path) -> None:
    import crc32c

    CheckpointStore(tmp_path, fsync=False, run_id="run-7").save(make_snapshot(10))
    manifest = CheckpointManifest()
    ckpt = tmp_path / "ckpt-000000000010"
    manifest.ParseFromString((ckpt / "manifest.pb").read_bytes())
    assert manifest.run_id == "run-7" and manifest.global_step == 10 and manifest.epoch == 1
    for f in manifest.files:
        data = (ckpt / f.name).read_bytes()
        assert (f.size_bytes, f.crc32c, f.sha256) == (len(data), crc32c.crc32c(data), "")
    assert sorted(f.name for f in manifest.files) == ["model.pt", "state.pt"]


def test_disk_full_keeps_previous_checkpoints_logs_abort_and_raises_typed_error(tmp_path: Path) -> None:
    full = {"on": False}

    def fault(name: str) -> None:
        if full["on"] and name.endswith("state.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")

    store = CheckpointStore(tmp_path, fsync=False, fault=fault)
    store.save(make_snapshot(10))
    store.save(make_snapshot(20))
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt-000000000020").iterdir()}
    full["on"] = True
    message = "ckpt-000000000030 not written: .*No space left.*free disk space"
    with pytest.raises(CheckpointWriteError, match=message) as info:
        store.save(make_snapshot(30))
    assert info.value.errno == errno.ENOSPC and store.last_error is info.value
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("wal")) == [
        "ckpt-000000000010", "ckpt-000000000020"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt-000000000020").iterdir()} == before
    types = [(r.type, r.txn_id) for r in replay(tmp_path).records]
    assert types[-2:] == [(RecordType.BEGIN, 3), (RecordType.ABORT, 3)]
    full["on"] = False
    store.save(make_snapshot(40))
    store.close()
    result = recover(tmp_path)
    assert result.checkpoint is not None and result.checkpoint.step == 40 and result.events == []


def test_retention_keeps_last_n_committed(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2, fsync=False)
    for step in (10, 20, 30, 40):
        store.save(make_snapshot(step))
    store.close()
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000000000030", "ckpt-000000000040"]
    assert [c["name"] for c in inspect(tmp_path)["checkpoints"]] == ["ckpt-000000000040", "ckpt-000000000030"]


def test_wal_segments_are_pruned_but_retained_commits_survive(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2, fsync=False, wal_max_bytes=400)
    for step in range(10, 130, 10):
        store.save(make_snapshot(step))
    store.close()
    assert len(list(tmp_path.glob("wal-*.log"))) < 6
    reopened = CheckpointStore(tmp_path, keep_last=2, fsync=False)
    assert [c.step for c in reopened.committed()] == [120, 110]
    reopened.close()
    assert recover(tmp_path).checkpoint is not None


def test_reaching_the_same_step_again_supersedes_the_old_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    store.save(make_snapshot(10))
    second = make_snapshot(10)
    second.state["trainer"]["note"] = "after rollback"
    store.save(second)
    store.close()
    loaded = recover(tmp_path).checkpoint
    assert loaded is not None and loaded.state["trainer"]["note"] == "after rollback"
    # the re-commit gets its own transaction-named dir; the old one is retired after its COMMIT
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("wal")) == ["ckpt-000000000010.t2"]


def test_reopened_store_continues_transaction_ids(tmp_path: Path) -> None:
    first = CheckpointStore(tmp_path, fsync=False)
    first.save(make_snapshot(10))
    first.close()
    second = CheckpointStore(tmp_path, fsync=False)
    info = second.save(make_snapshot(20))
    second.close()
    assert info.txn_id == 2


def test_journaled_commands_after_the_recovered_checkpoint_are_returned(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    store.save(make_snapshot(10))
    command = seed_command(SEED_OP_GERMINATE, issued_by="test", target_seed_id="s9", blueprint_id="mlp")
    store.journal_command(command, epoch=1, step=15)
    store.close()
    result = recover(tmp_path)
    assert [(r.epoch, r.step) for r in result.commands] == [(1, 15)]
    from esper.leyline import AdaptationCommand

    assert parse(AdaptationCommand, result.commands[0].payload).target_seed_id == "s9"


class _Opaque:
    pass


def test_state_with_unsupported_object_is_refused_before_touching_disk(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    snap = make_snapshot(10)
    snap.state["trainer"]["opaque"] = _Opaque()
    with pytest.raises(CheckpointStateError, match=r"state\['trainer'\]\['opaque'\] is a _Opaque; .*state_dict"):
        store.save(snap)
    with pytest.raises(CheckpointStateError):
        store.save_async(snap).result(timeout=10)
    store.close()
    assert list(tmp_path.glob("ckpt-*")) == [] and replay(tmp_path).records == []


def test_fsync_enabled_save_round_trips(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)  # the durable default path, O_DSYNC WAL included
    store.save(make_snapshot(10))
    store.close()
    loaded = recover(tmp_path).checkpoint
    assert loaded is not None
    assert_state_equal(loaded.state["model"], make_state(10)["model"])


def test_failed_resave_of_same_step_keeps_the_committed_one(tmp_path: Path) -> None:
    fail = {"on": False}

    def fault(name: str) -> None:
        if fail["on"] and name.endswith("manifest.pb"):
            raise OSError(errno.EIO, "Input/output error")

    store = CheckpointStore(tmp_path, fsync=False, fault=fault)
    store.save(make_snapshot(10))
    fail["on"] = True
    with pytest.raises(CheckpointWriteError, match="Input/output error.*check the disk"):
        store.save(make_snapshot(10))
    store.close()
    result = recover(tmp_path)
    assert result.checkpoint is not None and result.checkpoint.txn_id == 1 and result.events == []


def test_load_for_rollback_returns_the_newest_state(tmp_path: Path) -> None:
    from esper.tolaria.checkpoint import load_for_rollback

    store = CheckpointStore(tmp_path, fsync=False)
    store.save(make_snapshot(10))
    store.save(make_snapshot(20))
    store.close()
    assert_state_equal(load_for_rollback(tmp_path)["model"], make_state(20)["model"])


def test_commit_failure_after_rename_restores_the_superseded_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    store.save(make_snapshot(10))
    real_append = store._wal.append

    def failing_commit(rtype: RecordType, *args: object, **kwargs: object) -> object:
        if rtype == RecordType.COMMIT:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_append(rtype, *args, **kwargs)  # type: ignore[arg-type]

    store._wal.append = failing_commit  # type: ignore[method-assign,assignment]
    second = make_snapshot(10)
    second.state["trainer"]["note"] = "never committed"
    with pytest.raises(CheckpointWriteError):
        store.save(second)
    store._wal.append = real_append  # type: ignore[method-assign]
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("wal")) == ["ckpt-000000000010"]
    loaded = recover(tmp_path).checkpoint
    assert loaded is not None and loaded.txn_id == 1 and loaded.state["trainer"]["note"] is None


def test_a_reopened_store_reports_each_checkpoint_size_as_on_disk(tmp_path: Path) -> None:
    first = CheckpointStore(tmp_path, fsync=False)
    written = [first.save(make_snapshot(step)) for step in (10, 20)]
    first.close()
    reopened = CheckpointStore(tmp_path, fsync=False)
    try:
        sizes = {c.name: c.size_bytes for c in reopened.committed()}
        on_disk = {c.name: sum(f.stat().st_size for f in c.path.iterdir()) for c in written}
        assert sizes == on_disk == {c.name: c.size_bytes for c in written}
        assert all(size > 0 for size in sizes.values())
    finally:
        reopened.close()
