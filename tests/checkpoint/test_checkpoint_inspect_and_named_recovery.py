"""The store side of `tolaria inspect --json` and `tolaria resume --from`: what inspect lists,
that it refuses a non-run, and that recovery restores exactly a named committed checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from ckpt_helpers import make_snapshot

from esper.tolaria.checkpoint import CheckpointNotFound, CheckpointStore, corrupt_latest, inspect, recover


@pytest.fixture()
def three(tmp_path: Path) -> Path:
    directory = tmp_path / "run" / "checkpoints"
    store = CheckpointStore(directory, fsync=False)
    for step in (10, 20, 30):
        store.save(make_snapshot(step))
    store.close()
    return directory


@pytest.mark.parametrize("what", ["empty dir", "a file", "unrelated dir"])
def test_inspect_of_something_that_is_not_a_run_is_an_error_not_an_empty_table(tmp_path: Path, what: str) -> None:
    target = tmp_path / "target"
    if what == "a file":
        target.write_text("hello")
    else:
        target.mkdir()
        if what == "unrelated dir":
            (target / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint and no write-ahead log; pass a run dir"):
        inspect(target)


def test_inspect_lists_each_checkpoint_with_epoch_step_txn_seeds_size_and_status(three: Path) -> None:
    corrupt_latest(three)
    listed = inspect(three.parent)["checkpoints"]
    assert [c["name"] for c in listed] == ["ckpt-000000000030", "ckpt-000000000020", "ckpt-000000000010"]
    newest, middle = listed[0], listed[1]
    assert {"name", "epoch", "step", "txn", "seeds", "size_bytes", "committed", "status"} <= newest.keys()
    assert newest["status"] == "corrupt: model.pt crc32c mismatch" and newest["committed"] is True
    assert (middle["epoch"], middle["step"], middle["txn"], middle["status"]) == (2, 20, 2, "ok")
    assert middle["seeds"] == [{"seed_id": "s1", "stage": "BLENDING"}] and middle["size_bytes"] > 0


def test_recover_by_name_restores_exactly_that_checkpoint(three: Path) -> None:
    result = recover(three, name="ckpt-000000000020")
    assert result.checkpoint is not None and result.checkpoint.step == 20
    assert result.commands == []  # a branch does not replay the journal of the run it left


@pytest.mark.parametrize("name", ["ckpt-000000000040", "../ckpt-000000000010", "latest"])
def test_recover_of_an_unknown_name_names_the_checkpoints_that_exist(three: Path, name: str) -> None:
    message = (f"{name!r} is not a committed checkpoint in .*; committed checkpoints: ckpt-000000000030, "
               "ckpt-000000000020, ckpt-000000000010")
    with pytest.raises(CheckpointNotFound, match=message):
        recover(three, name=name)


def test_recover_of_a_named_corrupt_checkpoint_says_why_and_what_else_exists(three: Path) -> None:
    corrupt_latest(three)
    with pytest.raises(CheckpointNotFound, match="ckpt-000000000030 does not verify: ckpt-000000000030/model.pt "
                                                 "crc32c mismatch; other committed checkpoints: ckpt-000000000020"):
        recover(three, name="ckpt-000000000030")


def test_recovery_says_which_newer_checkpoints_it_passed_over_and_why(three: Path) -> None:
    corrupt_latest(three)
    (three / "ckpt-000000000040").mkdir()  # a dir without a COMMIT
    result = recover(three)
    assert result.checkpoint is not None and result.checkpoint.step == 20
    assert result.events == ["ckpt-000000000030/model.pt crc32c mismatch; fell back to ckpt-000000000020",
                             "ckpt-000000000040 has no durable COMMIT in the WAL; removed"]
