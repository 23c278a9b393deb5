"""What recovery hands back, exactly: the snapshot a loaded checkpoint becomes (what the snapshot
cache and a rollback then trust), and which journaled commands a rewind to a command's own step keeps."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from ckpt_helpers import assert_state_equal, forge_manifest, make_snapshot, make_state

from esper.leyline import SEED_OP_GERMINATE, AdaptationCommand, CheckpointFile, CheckpointManifest, parse, seed_command
from esper.tolaria.checkpoint import BEST, BestScore, CheckpointStore, WriteAheadLog, recover
from esper.tolaria.checkpoint.layout import (
    MAX_DATA_FILE_BYTES,
    MODEL_FILE,
    STATE_FILE,
    checkpoint_name,
    crc32c_of,
    remove_path,
    sha256_hex,
)
from esper.tolaria.checkpoint.recovery import (
    CheckpointNotFound,
    CommitEntry,
    LoadedCheckpoint,
    RecoveryResult,
    Verification,
    committed_index,
    load_for_rollback,
    max_manifest_txn,
    verify_and_load,
    verify_checkpoint,
)
from esper.tolaria.checkpoint.wal import RecordType, replay


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
    _unloadable_model(newest)
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
    with pytest.raises(CheckpointNotFound, match=r"no valid committed checkpoint in .*: empty$"):
        load_for_rollback(tmp_path)


def test_asking_for_a_checkpoint_by_name_where_there_is_none_says_none(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound, match=r"committed checkpoints: none \(see `tolaria inspect"):
        recover(tmp_path, name=checkpoint_name(10))
    store = CheckpointStore(tmp_path, fsync=False)
    store.save(make_snapshot(10))
    store.close()
    (tmp_path / checkpoint_name(10) / "manifest.pb").unlink()
    with pytest.raises(CheckpointNotFound, match=r"manifest.pb missing; other committed checkpoints: none$"):
        recover(tmp_path, name=checkpoint_name(10))


def test_a_refused_file_name_is_quoted_cut_to_80_characters(three: Path) -> None:
    newest = three / checkpoint_name(30)
    forge_manifest(newest, lambda m: m.files.append(CheckpointFile(name="../" + "x" * 200, size_bytes=1, crc32c=0)))
    result = recover(three, clean=False)
    assert _loaded(result).step == 20
    assert any(repr("../" + "x" * 77) + ", which is not" in e for e in result.events), result.events


def test_a_file_declared_at_exactly_the_size_cap_is_checked_against_its_size_not_refused(three: Path) -> None:
    def at_cap(manifest: CheckpointManifest) -> None:
        for f in manifest.files:
            if f.name == MODEL_FILE:
                f.size_bytes = MAX_DATA_FILE_BYTES

    forge_manifest(three / checkpoint_name(30), at_cap)
    result = recover(three, clean=False)
    assert _loaded(result).step == 20
    problem = next(e for e in result.events if e.startswith(checkpoint_name(30)))
    assert f"manifest says {MAX_DATA_FILE_BYTES}" in problem and "limit" not in problem, problem


def _loaded(result: RecoveryResult) -> LoadedCheckpoint:
    assert result.checkpoint is not None, result.events
    return result.checkpoint


# ------------------------------------------------------------------ one checkpoint's verdict, exactly


def _entry(directory: Path, name: str) -> CommitEntry:
    return next(e for e in committed_index(replay(directory).records) if e.name == name)


def test_a_sound_checkpoint_verifies_with_its_manifest_and_no_problem(three: Path) -> None:
    name = checkpoint_name(30)
    verdict = verify_checkpoint(three / name, _entry(three, name))
    assert verdict.ok is True and verdict.problem == "" and verdict.manifest is not None
    assert verdict.manifest.txn_id == _entry(three, name).txn_id


def test_a_zero_byte_file_listed_at_zero_bytes_verifies(three: Path) -> None:
    checkpoint = three / checkpoint_name(30)
    (checkpoint / "empty.bin").write_bytes(b"")
    empty = CheckpointFile(name="empty.bin", size_bytes=0, crc32c=0)
    forge_manifest(checkpoint, lambda m: m.files.append(empty), commit=False)
    verdict = verify_checkpoint(checkpoint)
    assert (verdict.ok, verdict.problem) == (True, "")


def _not_a_dir(c: Path) -> None:
    remove_path(c)
    c.write_text("a file where the checkpoint was")


def _no_manifest(c: Path) -> None:
    (c / "manifest.pb").unlink()


def _garbage_manifest(c: Path) -> None:
    (c / "manifest.pb").write_bytes(b"\xff\xff\xff")


def _listed_twice(c: Path) -> None:
    again = CheckpointFile(name=MODEL_FILE, size_bytes=1, crc32c=0)
    forge_manifest(c, lambda m: m.files.append(again), commit=False)


def _state_unlisted(c: Path) -> None:
    def drop(m: CheckpointManifest) -> None:
        kept = [f for f in m.files if f.name != STATE_FILE]
        del m.files[:]
        m.files.extend(kept)
    forge_manifest(c, drop, commit=False)


@pytest.mark.parametrize(("damage", "with_commit", "problem", "has_manifest"), [
    (_not_a_dir, False, "is not a directory (a link or a file stands in its place)", False),
    (_no_manifest, False, "manifest.pb missing", False),
    (_garbage_manifest, True, "manifest.pb sha256 mismatch with its WAL COMMIT", False),
    (_garbage_manifest, False, "manifest.pb does not parse: ", False),
    (_listed_twice, False, f"manifest.pb lists '{MODEL_FILE}' twice", True),
    (_state_unlisted, False, f"manifest.pb lists ['{MODEL_FILE}'], missing ['{STATE_FILE}']", True),
])
def test_each_kind_of_damage_fails_verification_naming_it(
        three: Path, damage: Callable[[Path], None], with_commit: bool, problem: str, has_manifest: bool) -> None:
    name = checkpoint_name(30)
    entry = _entry(three, name)
    damage(three / name)
    verdict = verify_checkpoint(three / name, entry if with_commit else None)
    assert verdict.ok is False and verdict.problem.startswith(problem), verdict.problem
    assert (verdict.manifest is not None) == has_manifest


def test_a_manifest_of_another_transaction_than_its_commit_fails_naming_both(three: Path) -> None:
    name = checkpoint_name(30)
    entry = _entry(three, name)
    stale = dataclasses.replace(entry, txn_id=entry.txn_id + 7)
    verdict = verify_checkpoint(three / name, stale)
    assert verdict.ok is False and verdict.manifest is None
    assert verdict.problem == (f"manifest.pb txn {entry.txn_id} has no durable COMMIT "
                               f"(the WAL commits txn {entry.txn_id + 7} for this name)")


def test_a_checksummed_file_that_does_not_load_fails_with_its_manifest(three: Path) -> None:
    name = checkpoint_name(30)
    _unloadable_model(three / name, commit=False)
    verdict = verify_and_load(three / name, dataclasses.replace(_entry(three, name), manifest_sha256=sha256_hex(
        (three / name / "manifest.pb").read_bytes())))
    assert isinstance(verdict, Verification)
    assert verdict.ok is False and verdict.manifest is not None
    assert verdict.problem.startswith(f"{MODEL_FILE} does not load: ")


def test_a_commit_in_a_format_this_version_cannot_read_is_skipped(three: Path) -> None:
    wal = WriteAheadLog(three, fsync=False)
    wal.append(RecordType.COMMIT, 99, 9, 90, json.dumps({"format": "from the future"}).encode())
    wal.close()
    result = recover(three, clean=False)
    assert _loaded(result).step == 30 and result.events == []


def test_the_highest_transaction_any_readable_manifest_names_is_found(three: Path) -> None:
    newest = _entry(three, checkpoint_name(30)).txn_id
    assert max_manifest_txn(three) == newest
    _garbage_manifest(three / checkpoint_name(30))
    assert max_manifest_txn(three) == _entry(three, checkpoint_name(20)).txn_id < newest


def test_a_damaged_data_file_fails_verification_naming_the_file_with_the_manifest(three: Path) -> None:
    checkpoint = three / checkpoint_name(30)
    data = bytearray((checkpoint / MODEL_FILE).read_bytes())
    data[-1] ^= 0xFF
    (checkpoint / MODEL_FILE).write_bytes(bytes(data))
    verdict = verify_checkpoint(checkpoint)
    assert verdict.ok is False and verdict.problem == f"{MODEL_FILE} crc32c mismatch"
    assert verdict.manifest is not None


def test_a_manifest_that_is_not_a_regular_file_fails_verification(three: Path) -> None:
    checkpoint = three / checkpoint_name(30)
    (checkpoint / "manifest.pb").unlink()
    os.mkfifo(checkpoint / "manifest.pb")
    verdict = verify_checkpoint(checkpoint)
    assert verdict.ok is False and verdict.problem.startswith("manifest.pb ") and verdict.manifest is None


def test_when_no_best_checkpoint_verifies_the_error_lists_each_failure(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=1, keep_best=2, fsync=False)
    for step, value in ((10, 0.9), (20, 0.8)):
        store.save(make_snapshot(step), BestScore("accuracy", "max", value, step // 10, 2))
    store.close()
    for step in (10, 20):
        (tmp_path / checkpoint_name(step) / "manifest.pb").unlink()
    with pytest.raises(CheckpointNotFound) as caught:
        recover(tmp_path, name=BEST)
    assert str(caught.value) == (f"--from best: no best checkpoint verifies: best checkpoint "
                                 f"{checkpoint_name(10)}/manifest.pb missing; best checkpoint "
                                 f"{checkpoint_name(20)}/manifest.pb missing")


def _unloadable_model(checkpoint: Path, *, commit: bool = True) -> None:
    """model.pt replaced by bytes that are no tensor archive, its manifest entry made to match them."""
    garbage = b"not a tensor archive"
    (checkpoint / MODEL_FILE).write_bytes(garbage)

    def match(manifest: CheckpointManifest) -> None:
        for f in manifest.files:
            if f.name == MODEL_FILE:
                f.size_bytes, f.crc32c = len(garbage), crc32c_of(garbage)

    forge_manifest(checkpoint, match, commit=commit)
