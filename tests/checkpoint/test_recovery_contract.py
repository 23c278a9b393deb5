"""What recovery hands back, exactly: the snapshot a loaded checkpoint becomes (what the snapshot
cache and a rollback then trust), and which journaled commands a rewind to a command's own step keeps."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from ckpt_helpers import assert_state_equal, make_snapshot, make_state

from esper.leyline import SEED_OP_GERMINATE, AdaptationCommand, CheckpointFile, CheckpointManifest, parse, seed_command
from esper.tolaria.checkpoint import CheckpointStore, WriteAheadLog, recover
from esper.tolaria.checkpoint.layout import (
    MAX_DATA_FILE_BYTES,
    MODEL_FILE,
    checkpoint_name,
    crc32c_of,
    remove_path,
    sha256_hex,
)
from esper.tolaria.checkpoint.recovery import (
    CheckpointNotFound,
    LoadedCheckpoint,
    RecoveryResult,
    load_for_rollback,
)
from esper.tolaria.checkpoint.wal import RecordType


def test_a_loaded_checkpoint_becomes_a_healthy_snapshot_of_its_own_step_state_and_size(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    store.save(make_snapshot(10, epoch=1))
    info = store.save(make_snapshot(20, epoch=2))
    store.close()
    loaded = recover(tmp_path).checkpoint
    assert loaded is not None
    snap = loaded.snapshot()
    assert (snap.snapshot_id, snap.epoch, snap.global_step, snap.healthy) == (info.name, 2, 20, True)
    assert snap.state is loaded.state
    expected = make_state(20)
    for section in ("model", "optimizer", "trainer"):
        assert_state_equal(snap.state[section], expected[section])
    assert snap.nbytes == sum(f.size_bytes for f in loaded.manifest.files) > 0


def test_a_rewind_to_a_commands_own_step_keeps_that_command(tmp_path: Path) -> None:
    def germinate(slot: str) -> AdaptationCommand:
        return seed_command(SEED_OP_GERMINATE, issued_by="test", target_seed_id=slot, blueprint_id="mlp")

    store = CheckpointStore(tmp_path, fsync=False)
    store.save(make_snapshot(10))
    store.journal_command(germinate("a"), epoch=1, step=15)
    store.journal_command(germinate("b"), epoch=1, step=18)
    store.journal_rewind(epoch=1, step=15, reason="fast rollback to the snapshot taken after a's apply")
    store.close()
    replayed = recover(tmp_path, clean=False).commands
    assert [(r.step, parse(AdaptationCommand, r.payload).target_seed_id) for r in replayed] == [(15, "a")]


# ------------------------------------------------------------------ which checkpoint recovery picks


@pytest.fixture()
def three(tmp_path: Path) -> Path:
    """Checkpoints at steps 10, 20, 30 (epochs 1, 2, 3), newest last, none retired."""
    store = CheckpointStore(tmp_path, keep_last=5, fsync=False)
    for step in (10, 20, 30):
        store.save(make_snapshot(step))
    store.close()
    return tmp_path


def test_before_an_epoch_means_strictly_before_it(three: Path) -> None:
    assert _loaded(recover(three, before_epoch=3)).epoch == 2
    assert _loaded(recover(three, before_epoch=2)).epoch == 1
    assert recover(three, before_epoch=1).checkpoint is None


def test_a_newest_checkpoint_missing_on_disk_is_reported_and_the_next_is_loaded(three: Path) -> None:
    remove_path(three / checkpoint_name(30))
    result = recover(three, clean=False)
    assert _loaded(result).step == 20 and result.checkpoint is not None
    assert result.checkpoint.path == three / checkpoint_name(20)
    assert [e for e in result.events if "missing on disk" in e] == [
        f"{checkpoint_name(30)} committed in the WAL but missing on disk; fell back to {checkpoint_name(20)}"]


def test_checkpoints_older_than_the_newest_on_disk_may_be_gone_without_a_word(three: Path) -> None:
    remove_path(three / checkpoint_name(10))  # as retention leaves it
    result = recover(three, clean=False)
    assert _loaded(result).step == 30 and result.events == []


def test_with_every_committed_checkpoint_gone_each_is_reported_missing(three: Path) -> None:
    for step in (10, 20, 30):
        remove_path(three / checkpoint_name(step))
    result = recover(three, clean=False)
    assert result.checkpoint is None
    assert sorted(e.split()[0] for e in result.events if "missing on disk" in e) == [
        checkpoint_name(s) for s in (10, 20, 30)]


def test_a_file_whose_checksum_matches_but_does_not_load_is_passed_over(three: Path) -> None:
    newest = three / checkpoint_name(30)
    garbage = b"not a tensor archive"
    (newest / MODEL_FILE).write_bytes(garbage)

    def match(manifest: CheckpointManifest) -> None:
        for f in manifest.files:
            if f.name == MODEL_FILE:
                f.size_bytes, f.crc32c = len(garbage), crc32c_of(garbage)

    _recommit(newest, match)
    result = recover(three, clean=False)
    assert _loaded(result).step == 20
    assert any(e.startswith(f"{newest.name}/{MODEL_FILE} does not load") for e in result.events), result.events


def test_a_full_rollbacks_load_removes_nothing_from_the_directory(three: Path) -> None:
    uncommitted = [three / checkpoint_name(40), three / checkpoint_name(50)]
    for path in uncommitted:
        path.mkdir()
    leftover = three / f".{checkpoint_name(60)}.7.tmp"
    leftover.mkdir()
    state = load_for_rollback(three)
    assert state["trainer"]["epoch"] == 30
    assert all(p.is_dir() for p in [*uncommitted, leftover])
    kept = recover(three, clean=False)
    assert all(p.is_dir() for p in [*uncommitted, leftover])
    assert [e for e in kept.events if "ignored and kept" in e] == [
        f"{p.name} has no durable COMMIT in the WAL; ignored and kept" for p in uncommitted]


def test_a_full_rollback_with_no_checkpoint_says_so(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound, match="no valid committed checkpoint"):
        load_for_rollback(tmp_path)


def test_a_refused_file_name_is_quoted_cut_to_80_characters(three: Path) -> None:
    newest = three / checkpoint_name(30)
    _recommit(newest, lambda m: m.files.append(CheckpointFile(name="../" + "x" * 200, size_bytes=1, crc32c=0)))
    result = recover(three, clean=False)
    assert _loaded(result).step == 20
    assert any(repr("../" + "x" * 77) + ", which is not" in e for e in result.events), result.events


def test_a_file_declared_at_exactly_the_size_cap_is_checked_against_its_size_not_refused(three: Path) -> None:
    def at_cap(manifest: CheckpointManifest) -> None:
        for f in manifest.files:
            if f.name == MODEL_FILE:
                f.size_bytes = MAX_DATA_FILE_BYTES

    _recommit(three / checkpoint_name(30), at_cap)
    result = recover(three, clean=False)
    assert _loaded(result).step == 20
    problem = next(e for e in result.events if e.startswith(checkpoint_name(30)))
    assert f"manifest says {MAX_DATA_FILE_BYTES}" in problem and "limit" not in problem, problem


def _loaded(result: RecoveryResult) -> LoadedCheckpoint:
    assert result.checkpoint is not None, result.events
    return result.checkpoint


def _recommit(checkpoint: Path, edit: Callable[[CheckpointManifest], None]) -> None:
    """Rewrite the checkpoint's manifest with `edit` and commit it as a newer transaction, as a
    forger with write access could (the WAL is CRC only)."""
    manifest = CheckpointManifest()
    manifest.ParseFromString((checkpoint / "manifest.pb").read_bytes())
    edit(manifest)
    manifest.txn_id = 50
    data = manifest.SerializeToString(deterministic=True)
    (checkpoint / "manifest.pb").write_bytes(data)
    wal = WriteAheadLog(checkpoint.parent, fsync=False)
    wal.append(RecordType.COMMIT, manifest.txn_id, 0, 0,
               json.dumps({"checkpoint": checkpoint.name, "manifest_sha256": sha256_hex(data)}).encode())
    wal.close()
