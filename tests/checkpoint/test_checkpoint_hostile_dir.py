"""A hostile run directory (forged WAL names, manifest paths, FIFOs, links, huge files): clear
errors, no hang, and nothing outside the run directory is read, followed or deleted (item 3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from ckpt_helpers import forge_manifest, make_snapshot

from esper.leyline import CheckpointFile, CheckpointManifest
from esper.tolaria.checkpoint import CheckpointStore, WriteAheadLog, recover
from esper.tolaria.checkpoint import recovery as recovery_module
from esper.tolaria.checkpoint.wal import RecordType

NEWEST, PREVIOUS = "ckpt-000000000020", "ckpt-000000000010"


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """<tmp>/victim (must survive) beside <tmp>/run/checkpoints with two committed checkpoints."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    store = CheckpointStore(tmp_path / "run" / "checkpoints", fsync=False)
    store.save(make_snapshot(10))
    store.save(make_snapshot(20))
    store.close()
    return tmp_path / "run" / "checkpoints"


def _append(directory: Path, rtype: RecordType, txn: int, payload: bytes) -> None:
    wal = WriteAheadLog(directory, fsync=False)
    wal.append(rtype, txn, 0, 0, payload)
    wal.close()


def test_a_forged_wal_commit_naming_a_path_outside_is_ignored_and_deletes_nothing(run: Path) -> None:
    forged = json.dumps({"checkpoint": "../../victim", "manifest_sha256": "0" * 64}).encode()
    _append(run, RecordType.COMMIT, 99, forged)
    store = CheckpointStore(run, keep_last=1, fsync=False)  # retention would have removed "../../victim"
    store.save(make_snapshot(30))
    store.save(make_snapshot(40))
    store.close()
    result = recover(run)
    assert (run.parent.parent / "victim" / "precious.txt").read_text() == "keep me"
    assert result.checkpoint is not None and result.checkpoint.step == 40
    assert any("WAL COMMIT names '../../victim', not a checkpoint name" in e for e in result.events), result.events


@pytest.mark.parametrize("bad_name", ["/etc/passwd", "../x", "..", ".hidden", "a/b"])
def test_a_manifest_listing_a_path_is_refused_naming_the_file(run: Path, bad_name: str) -> None:
    def add(manifest: CheckpointManifest) -> None:
        manifest.files.append(CheckpointFile(name=bad_name, size_bytes=1, crc32c=0))

    forge_manifest(run / NEWEST, add)
    result = recover(run, clean=False)
    assert result.checkpoint is not None and result.checkpoint.name == PREVIOUS
    assert result.events == [f"{NEWEST}/manifest.pb lists the file name {bad_name!r}, which is not a checkpoint "
                             f"file name (refused); fell back to {PREVIOUS}"]


@pytest.mark.timeout(20)
def test_a_fifo_in_place_of_a_data_file_is_refused_without_hanging(run: Path) -> None:
    (run / NEWEST / "model.pt").unlink()
    os.mkfifo(run / NEWEST / "model.pt")
    result = recover(run, clean=False)
    assert result.checkpoint is not None and result.checkpoint.name == PREVIOUS
    assert result.events[0].startswith(f"{NEWEST}/model.pt is not a regular file (mode p")


@pytest.mark.timeout(20)
def test_a_fifo_in_place_of_a_wal_segment_or_manifest_does_not_hang(run: Path) -> None:
    (run / NEWEST / "manifest.pb").unlink()
    os.mkfifo(run / NEWEST / "manifest.pb")
    os.mkfifo(run / "wal-000002.log")
    result = recover(run, clean=False)
    assert result.checkpoint is not None and result.checkpoint.name == PREVIOUS
    assert any(e.startswith("wal-000002.log corrupt record at offset 0: not read:") for e in result.events)
    assert any(e.startswith(f"{NEWEST}/manifest.pb is not a regular file") for e in result.events)


def test_links_are_never_followed_neither_to_read_nor_to_delete(run: Path) -> None:
    victim = run.parent.parent / "victim"
    (run / NEWEST / "state.pt").unlink()
    (run / NEWEST / "state.pt").symlink_to(run / PREVIOUS / "state.pt")  # even a link to good bytes
    (run / "ckpt-000000000999").symlink_to(victim, target_is_directory=True)  # an "uncommitted" dir
    (run / ".ckpt-000000000999.7.tmp").symlink_to(victim, target_is_directory=True)  # a "leftover"
    result = recover(run, clean=True)
    assert result.checkpoint is not None and result.checkpoint.name == PREVIOUS
    assert result.events[0] == f"{NEWEST}/state.pt is a symbolic link, not a regular file; fell back to {PREVIOUS}"
    assert (victim / "precious.txt").read_text() == "keep me"
    assert not (run / ".ckpt-000000000999.7.tmp").is_symlink()  # the leftover link itself was removed


def test_a_huge_sparse_file_is_refused_by_its_size_before_a_byte_is_read(run: Path) -> None:
    with open(run / NEWEST / "model.pt", "r+b") as f:
        f.truncate(64 * 2**30)  # sparse: no disk used
    result = recover(run, clean=False)
    assert result.checkpoint is not None and result.checkpoint.name == PREVIOUS
    assert "model.pt size 68719476736 bytes, manifest says" in result.events[0]


def test_a_manifest_declaring_a_file_over_the_cap_is_refused_before_reading(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recovery_module, "MAX_DATA_FILE_BYTES", 2**20)

    def grow(manifest: CheckpointManifest) -> None:
        manifest.files[0].size_bytes = 2**30

    forge_manifest(run / NEWEST, grow)
    with open(run / NEWEST / manifest_first_file(run), "r+b") as f:
        f.truncate(2**30)
    result = recover(run, clean=False)
    assert result.checkpoint is not None and result.checkpoint.name == PREVIOUS
    assert f"as {2**30} bytes, over the {2**20}-byte limit" in result.events[0]


def manifest_first_file(run: Path) -> str:
    manifest = CheckpointManifest()
    manifest.ParseFromString((run / NEWEST / "manifest.pb").read_bytes())
    return manifest.files[0].name


def test_a_reopened_store_reports_a_forged_commit_in_its_own_events(run: Path) -> None:
    forged = json.dumps({"checkpoint": "../../victim", "manifest_sha256": "0" * 64}).encode()
    _append(run, RecordType.COMMIT, 99, forged)
    store = CheckpointStore(run, fsync=False)
    try:
        assert any("WAL COMMIT names '../../victim', not a checkpoint name" in e for e in store.events), store.events
        assert sorted(c.name for c in store.committed()) == [PREVIOUS, NEWEST]
    finally:
        store.close()
