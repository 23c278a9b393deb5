"""checkpoint.keep_best at the store: the best-scored checkpoints survive retention, their scores are
durable in the WAL (a reopened store and every reader see them), and `recover(name="best")` loads
the best one that verifies."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from ckpt_helpers import assert_state_equal, make_snapshot

from esper.tolaria.checkpoint import BEST, BestScore, CheckpointNotFound, CheckpointStore, corrupt_latest, recover
from esper.tolaria.checkpoint.best import ranked_best, score_from_dict
from esper.tolaria.checkpoint.inspect import list_checkpoints


def score(value: float, epoch: int = 0, *, mode: str = "max", top_k: int = 1, metric: str = "accuracy") -> BestScore:
    return BestScore(metric, mode, value, epoch, top_k)


def on_disk(directory: Path) -> list[int]:
    return sorted(int(p.name[5:17]) for p in directory.glob("ckpt-*"))


def save_scored(store: CheckpointStore, values: dict[int, float], **kwargs: object) -> None:
    for step, value in values.items():
        store.save(make_snapshot(step), score(value, step // 10, **kwargs))  # type: ignore[arg-type]


def test_the_best_checkpoint_outlives_retention_of_the_last_n(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2, keep_best=1, fsync=False)
    save_scored(store, {10: 0.5, 20: 0.9, 30: 0.6, 40: 0.7, 50: 0.65, 60: 0.8})
    assert on_disk(tmp_path) == [20, 50, 60], "the last 2, and the best (0.9 at step 20) far beyond them"
    assert [c.step for c in store.best()] == [20]
    store.close()
    # A reopened store reads the scores back from the WAL's COMMITs and keeps protecting the best.
    reopened = CheckpointStore(tmp_path, keep_last=2, keep_best=1, fsync=False)
    save_scored(reopened, {70: 0.1, 80: 0.2})
    assert on_disk(tmp_path) == [20, 70, 80]
    assert recover(tmp_path, name=BEST).checkpoint.step == 20  # type: ignore[union-attr]
    reopened.close()


def test_without_keep_best_the_same_scores_protect_nothing(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2, fsync=False)
    save_scored(store, {10: 0.5, 20: 0.9, 30: 0.6, 40: 0.7})
    assert on_disk(tmp_path) == [30, 40]


def test_top_k_keeps_that_many_and_min_mode_ranks_the_lowest_first(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=1, keep_best=2, fsync=False)
    save_scored(store, {10: 0.30, 20: 0.10, 30: 0.50, 40: 0.20, 50: 0.40}, mode="min", top_k=2, metric="loss")
    assert on_disk(tmp_path) == [20, 40, 50]
    assert [c.step for c in store.best()] == [20, 40]


def test_a_tie_keeps_the_checkpoint_that_reached_the_value_first(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=1, keep_best=1, fsync=False)
    save_scored(store, {10: 0.9, 20: 0.9, 30: 0.1})
    assert on_disk(tmp_path) == [10, 30]


def test_unscored_checkpoints_are_never_best_and_age_out(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=1, keep_best=1, fsync=False)
    store.save(make_snapshot(0))  # the starting state: no epoch finished, no score
    save_scored(store, {10: 0.4})
    store.save(make_snapshot(15))  # a mid-epoch stop checkpoint
    assert on_disk(tmp_path) == [10, 15]


def test_a_step_checkpointed_again_replaces_its_best_scored_predecessor(tmp_path: Path) -> None:
    # The step was reached again (after a rollback or a branch): the old history is abandoned.
    store = CheckpointStore(tmp_path, keep_last=3, keep_best=1, fsync=False)
    save_scored(store, {10: 0.5, 20: 0.9})
    save_scored(store, {20: 0.6})
    assert [c.name for c in store.committed()] == ["ckpt-000000000020.t3", "ckpt-000000000010"]
    assert [c.best.value for c in store.best()] == [0.6]  # type: ignore[union-attr]


def test_resume_from_best_loads_exactly_that_checkpoint_and_replays_no_journal(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2, keep_best=1, fsync=False)
    save_scored(store, {10: 0.5, 20: 0.9, 30: 0.6, 40: 0.7})
    store.close()
    loaded = recover(tmp_path, name=BEST)
    assert loaded.checkpoint is not None and loaded.checkpoint.name == "ckpt-000000000020"
    expected = make_snapshot(20).state
    for section in ("model", "optimizer", "trainer"):
        assert_state_equal(loaded.checkpoint.state[section], expected[section])
    assert loaded.commands == []  # a branch, as `--from ckpt-...`


def test_from_best_without_a_scored_checkpoint_says_how_to_keep_one(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    store.save(make_snapshot(10))
    store.close()
    with pytest.raises(CheckpointNotFound, match=r"--from best: no checkpoint in .* is kept as best .*"
                                                 r"checkpoint.keep_best = \{top_k = 1\}"):
        recover(tmp_path, name=BEST)


def test_a_corrupt_best_checkpoint_is_passed_over_for_the_next_best(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=1, keep_best=2, fsync=False)
    save_scored(store, {10: 0.9, 20: 0.8, 30: 0.1}, top_k=2)
    store.close()
    victim = tmp_path / "ckpt-000000000010" / "model.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = recover(tmp_path, name=BEST, clean=False)
    assert result.checkpoint is not None and result.checkpoint.step == 20
    assert result.events == ["best checkpoint ckpt-000000000010/model.pt crc32c mismatch; fell back to "
                             "ckpt-000000000020"]
    corrupt_latest(tmp_path)  # the newest is not a best one: --from best does not care
    assert recover(tmp_path, name=BEST, clean=False).checkpoint.step == 20  # type: ignore[union-attr]


def test_the_best_checkpoints_commit_survives_wal_rotation_and_pruning(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=1, keep_best=1, wal_max_bytes=400, fsync=False)
    save_scored(store, {10 * i: (0.99 if i == 1 else 0.1 * (i % 5)) for i in range(1, 13)})
    store.close()
    assert len(list(tmp_path.glob("wal-*.log"))) > 1, "the test must rotate segments"
    assert recover(tmp_path, name=BEST).checkpoint.step == 10  # type: ignore[union-attr]
    assert on_disk(tmp_path) == [10, 120]


def test_a_crash_at_every_step_of_a_retiring_commit_keeps_the_best_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    store = CheckpointStore(directory, keep_last=1, keep_best=1)
    save_scored(store, {10: 0.9, 20: 0.2})
    copies: list[Path] = []

    def copy_here(label: str) -> None:
        copies.append(tmp_path / f"crash-{len(copies):03d}")
        shutil.copytree(directory, copies[-1], symlinks=True)

    store.crash_point = copy_here
    save_scored(store, {30: 0.3})  # retires step 20, never step 10
    store.close()
    assert len(copies) > 10
    for copy in copies:
        best = recover(copy, name=BEST)
        assert best.checkpoint is not None and best.checkpoint.step == 10, copy.name


def test_a_malformed_score_in_a_commit_is_ignored_not_trusted() -> None:
    good = {"metric": "accuracy", "mode": "max", "value": 0.5, "epoch": 3, "top_k": 1}
    assert score_from_dict(good) == BestScore("accuracy", "max", 0.5, 3, 1)
    for bad in ({**good, "mode": "sideways"}, {**good, "value": float("nan")}, {**good, "value": True},
                {**good, "top_k": 0}, {**good, "epoch": -1}, {**good, "metric": ""}, {**good, "metric": "m" * 65},
                {k: v for k, v in good.items() if k != "value"}, "accuracy", None):
        assert score_from_dict(bad) is None, bad


def test_ranking_follows_the_newest_scores_metric(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=5, keep_best=1, fsync=False)
    save_scored(store, {10: 0.99, 20: 0.5}, metric="accuracy")
    save_scored(store, {30: 0.4, 40: 0.3}, metric="loss", mode="min")
    assert [c.step for c in ranked_best(store.committed())] == [40]


def test_inspect_lists_which_checkpoints_are_kept_as_best(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2, keep_best=2, fsync=False)
    save_scored(store, {10: 0.9, 20: 0.5, 30: 0.8, 40: 0.1, 50: 0.2}, top_k=2)
    store.close()
    listed = {c["name"][5:17].lstrip("0"): c["best"] for c in list_checkpoints(tmp_path)}
    assert listed == {"10": {"rank": 1, "metric": "accuracy", "mode": "max", "value": 0.9, "epoch": 1},
                      "30": {"rank": 2, "metric": "accuracy", "mode": "max", "value": 0.8, "epoch": 3},
                      "40": None, "50": None}
