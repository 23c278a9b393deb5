"""Bit flips and truncation in every file type are detected; recovery falls back and names the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from ckpt_helpers import make_snapshot

from esper.tolaria.checkpoint import (
    CheckpointNotFound,
    CheckpointStore,
    corrupt_latest,
    inspect,
    load_for_rollback,
    recover,
    verify_checkpoint,
)

NEWEST = "ckpt-000000000120"
PREVIOUS = "ckpt-000000000080"


@pytest.fixture()
def two_checkpoints(tmp_path: Path) -> Path:
    store = CheckpointStore(tmp_path, fsync=False)
    store.save(make_snapshot(80))
    store.save(make_snapshot(120))
    store.close()
    return tmp_path


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x04
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("file_name", ["model.pt", "state.pt", "manifest.pb"])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_bit_flip_in_checkpoint_file_falls_back_with_event_naming_file(
    two_checkpoints: Path, file_name: str, where: str
) -> None:
    path = two_checkpoints / NEWEST / file_name
    size = path.stat().st_size
    _flip(path, {"start": 0, "middle": size // 2, "end": size - 1}[where])
    result = recover(two_checkpoints, clean=False)
    assert result.checkpoint is not None and result.checkpoint.name == PREVIOUS
    assert len(result.events) == 1
    assert result.events[0].startswith(f"{NEWEST}/{file_name} ")
    assert result.events[0].endswith(f"; fell back to {PREVIOUS}")


@pytest.mark.parametrize("file_name", ["model.pt", "state.pt", "manifest.pb"])
def test_truncated_checkpoint_file_falls_back(two_checkpoints: Path, file_name: str) -> None:
    path = two_checkpoints / NEWEST / file_name
    _truncate(path, path.stat().st_size - 7)
    result = recover(two_checkpoints)
    assert result.checkpoint is not None and result.checkpoint.name == PREVIOUS
    assert result.events[0].startswith(f"{NEWEST}/{file_name} ")


def test_model_sha_mismatch_event_text(two_checkpoints: Path) -> None:
    corrupt_latest(two_checkpoints)
    result = recover(two_checkpoints)
    assert result.events == [f"{NEWEST}/model.pt crc32c mismatch; fell back to {PREVIOUS}"]


def test_missing_file_is_reported(two_checkpoints: Path) -> None:
    (two_checkpoints / NEWEST / "state.pt").unlink()
    assert recover(two_checkpoints).events == [f"{NEWEST}/state.pt missing; fell back to {PREVIOUS}"]


def test_bit_flip_in_wal_commit_falls_back_and_names_the_segment(two_checkpoints: Path) -> None:
    segment = two_checkpoints / "wal-000001.log"
    size = segment.stat().st_size
    _flip(segment, size - 10)  # inside the newest COMMIT's payload
    result = recover(two_checkpoints)
    assert result.checkpoint is not None and result.checkpoint.name == PREVIOUS
    assert any(e.startswith("wal-000001.log corrupt record at offset") for e in result.events)
    # a WAL that lost a COMMIT to damage keeps the dir as evidence rather than deleting it
    assert any(e == f"{NEWEST} has no durable COMMIT in the WAL; ignored and kept" for e in result.events)
    assert (two_checkpoints / NEWEST).is_dir()


def test_truncated_wal_loses_the_last_commit_and_falls_back(two_checkpoints: Path) -> None:
    segment = two_checkpoints / "wal-000001.log"
    _truncate(segment, segment.stat().st_size - 5)
    result = recover(two_checkpoints)
    assert result.checkpoint is not None and result.checkpoint.name == PREVIOUS
    assert any(e.startswith("wal-000001.log torn tail at offset") for e in result.events)
    assert f"{NEWEST} has no durable COMMIT in the WAL; removed" in result.events
    assert not (two_checkpoints / NEWEST).exists()


def test_all_checkpoints_corrupt_gives_none_and_names_each(two_checkpoints: Path) -> None:
    for name in (NEWEST, PREVIOUS):
        _flip(two_checkpoints / name / "model.pt", 100)
    result = recover(two_checkpoints)
    assert result.checkpoint is None
    assert result.events == [f"{NEWEST}/model.pt crc32c mismatch; no valid committed checkpoint left",
                             f"{PREVIOUS}/model.pt crc32c mismatch; no valid committed checkpoint left"]
    with pytest.raises(CheckpointNotFound, match="model.pt crc32c mismatch"):
        load_for_rollback(two_checkpoints)


def test_uncommitted_dir_and_temp_leftovers_are_ignored_and_cleaned(two_checkpoints: Path) -> None:
    import shutil

    shutil.copytree(two_checkpoints / NEWEST, two_checkpoints / "ckpt-000000000999")
    (two_checkpoints / ".ckpt-000000001000.9.tmp").mkdir()
    (two_checkpoints / ".ckpt-000000001000.9.tmp" / "model.pt").write_bytes(b"partial")
    (two_checkpoints / NEWEST / ".state.pt.1.ab.tmp").write_bytes(b"partial")
    result = recover(two_checkpoints)
    assert result.checkpoint is not None and result.checkpoint.name == NEWEST
    assert result.events == ["ckpt-000000000999 has no durable COMMIT in the WAL; removed"]
    assert sorted(p.name for p in two_checkpoints.iterdir()) == [PREVIOUS, NEWEST, "wal-000001.log"]


def test_inspect_reports_sizes_seeds_and_status(two_checkpoints: Path) -> None:
    corrupt_latest(two_checkpoints)
    info = inspect(two_checkpoints)
    first, second = info["checkpoints"]
    assert first["name"] == NEWEST and first["status"] == "corrupt: model.pt crc32c mismatch"
    assert second["status"] == "ok" and second["epoch"] == 8 and second["step"] == 80
    assert second["seeds"] == [{"seed_id": "s1", "stage": "BLENDING"}]
    assert second["size_bytes"] == sum(second["files"].values()) > 0
    single = inspect(two_checkpoints / PREVIOUS)
    assert [c["name"] for c in single["checkpoints"]] == [PREVIOUS]
    assert verify_checkpoint(two_checkpoints / PREVIOUS).ok


def test_inspect_of_run_dir_uses_its_checkpoints_folder(tmp_path: Path) -> None:
    CheckpointStore(tmp_path / "checkpoints", fsync=False).save(make_snapshot(10))
    assert [c["status"] for c in inspect(tmp_path)["checkpoints"]] == ["ok"]


def test_a_manifest_edited_after_its_commit_is_not_trusted(tmp_path: Path) -> None:
    import torch

    from esper.leyline import CheckpointManifest
    from esper.tolaria.checkpoint import CheckpointStore, recover
    from esper.tolaria.state.snapshot import Snapshot

    store = CheckpointStore(tmp_path, keep_last=2)
    info = store.save(Snapshot("s", 1, 10, {"model": {"w": torch.ones(3)}, "trainer": {"epoch": 1}}))
    store.close()
    manifest_path = info.path / "manifest.pb"
    manifest = CheckpointManifest.FromString(manifest_path.read_bytes())
    manifest.files[0].crc32c ^= 1
    manifest_path.write_bytes(manifest.SerializeToString())
    result = recover(tmp_path, clean=False)
    assert result.checkpoint is None
    assert any("manifest.pb sha256 mismatch with its WAL COMMIT" in e for e in result.events)


def test_files_listed_with_a_sha256_by_older_manifests_are_checked_by_it(tmp_path: Path) -> None:
    from esper.leyline import CheckpointFile
    from esper.tolaria.checkpoint.layout import sha256_hex
    from esper.tolaria.checkpoint.recovery import _check_mapped

    path = tmp_path / "model.pt"
    path.write_bytes(b"weights")
    good = CheckpointFile(name="model.pt", size_bytes=7, sha256=sha256_hex(b"weights"))
    assert _check_mapped(path, good) == ""
    bad = CheckpointFile(name="model.pt", size_bytes=7, sha256=sha256_hex(b"weighTs"))
    assert _check_mapped(path, bad) == "sha256 mismatch"
    assert _check_mapped(tmp_path / "gone.pt", good) == "missing"
    longer = CheckpointFile(name="model.pt", size_bytes=8, sha256=sha256_hex(b"weights"))
    assert "truncated or extended" in _check_mapped(path, longer)
