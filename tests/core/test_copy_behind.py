"""Copy-behind snapshots: what is cloned at once, what is copied on the background thread, that
the trainer waits before writing, that a failed copy loses only that snapshot, and that a run with
copy-behind is bit-identical to one without. Also the every-N-steps snapshot cadence."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from trainer_fixtures import small_config  # type: ignore[import-not-found]

from esper.tolaria.checkpoint import CheckpointStore
from esper.tolaria.drills import FaultPlan
from esper.tolaria.recovery.snapshot_cache import SnapshotCache
from esper.tolaria.state.snapshot import SnapshotCopyError, deep_clone, state_checksum

CALM = {"boundary": {"state_assembly_ms": 1e4, "tamiyo_ms": 1e4, "apply_ms": 1e4, "check_ms": 1e4,
                     "total_ms": 1e5}, "handshake": {"tamiyo_timeout_s": 30.0}}


def _model_and_rule() -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    params = {p.data_ptr() for p in model.parameters()}
    return model, lambda section, x: section == "model" and x.data_ptr() in params


def test_parameters_are_copied_behind_and_buffers_at_once() -> None:
    model, rule = _model_and_rule()
    before = deep_clone(model.state_dict())
    cache = SnapshotCache(capacity=2)
    snapshot = cache.take("a", 0, 0, {"model": model.state_dict()}, defer=rule)
    assert snapshot is not None and cache.filling
    model(torch.randn(8, 4))  # the forward pass moves BatchNorm's running statistics at once
    cache.settle()
    assert not cache.filling and snapshot.ready is None
    with torch.no_grad():
        model[0].weight.add_(1.0)  # the optimizer writes only after settle
    assert state_checksum(snapshot.state["model"]) == state_checksum(before)
    assert cache.stats()["copied_behind"] == {"jobs": 1, "bytes": (4 * 6 + 6 + 6 + 6) * 4}
    cache.close()


def test_a_failed_background_copy_loses_only_that_snapshot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model, rule = _model_and_rule()
    cache = SnapshotCache(capacity=3)
    good = cache.take("good", 0, 0, {"model": model.state_dict()}, defer=rule)
    cache.settle()

    def broken(dst: Any, src: Any) -> None:
        raise RuntimeError("simulated copy failure")

    monkeypatch.setattr(torch, "_foreach_copy_", broken)
    bad = cache.take("bad", 0, 1, {"model": model.state_dict()}, defer=rule)
    assert bad is not None
    store = CheckpointStore(tmp_path / "ckpt")
    with pytest.raises(SnapshotCopyError, match="simulated copy failure"):
        store.save(bad)  # nothing half-written: the write never starts
    assert store.committed() == []
    with pytest.raises(SnapshotCopyError, match="background copy failed"):
        cache.settle()
    assert "bad" not in cache and "good" in cache and good is cache.get("good")
    store.close()
    cache.close()


def _run(make_trainer: Any, **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {**CALM, "run": {"epochs": 5}, "emergency": {"spike_lr_factor": 1.0, "watchdog_s": 30.0}}
    drills = sections.pop("drills", [])
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    trainer, _ = make_trainer(small_config(**cfg), faults=FaultPlan.parse(drills))
    return trainer.fit().summary  # type: ignore[no-any-return]


def test_a_run_with_copy_behind_is_bit_identical_to_one_without(make_trainer: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import esper.tolaria.recovery.snapshot_copier as copier

    real_run = copier.CopyJob.run

    def slow_copy(job: Any) -> None:  # slower than a step: any write before settle would be caught
        time.sleep(0.05)
        real_run(job)

    monkeypatch.setattr(copier.CopyJob, "run", slow_copy)
    behind = _run(make_trainer, snapshots={"copy_behind": True}, drills=["loss-spike@epoch=3,step=2"])
    monkeypatch.undo()
    at_once = _run(make_trainer, snapshots={"copy_behind": False}, drills=["loss-spike@epoch=3,step=2"])
    assert behind["safety"]["snapshot_cache"]["copied_behind"]["jobs"] >= 5
    assert at_once["safety"]["snapshot_cache"]["copied_behind"]["jobs"] == 0
    assert behind["rollbacks"] and behind["rollbacks"][0]["succeeded"]
    assert [h["train_loss"] for h in behind["history"]] == [h["train_loss"] for h in at_once["history"]]
    assert behind["final_state_sha256"] == at_once["final_state_sha256"]


def test_a_failed_copy_in_a_run_is_reported_and_training_goes_on(make_trainer: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import esper.tolaria.recovery.snapshot_copier as copier

    calls = {"n": 0}
    real_run = copier.CopyJob.run

    def fail_the_third(job: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            job._dst, job._src = [torch.zeros(2)], [torch.zeros(3)]  # shapes that cannot copy
        real_run(job)

    monkeypatch.setattr(copier.CopyJob, "run", fail_the_third)
    cfg = small_config(**CALM, run={"epochs": 4})
    trainer, bus = make_trainer(cfg)
    summary = trainer.fit().summary
    assert summary["epochs_completed"] == 4
    assert any("snapshot_copy_failed" in e for e in bus.events())


def test_snapshots_every_n_steps_are_rollback_targets_within_an_epoch(make_trainer: Any) -> None:
    summary = _run(make_trainer, snapshots={"every_steps": 4, "capacity": 8}, drills=["nan-loss@epoch=2,step=9"])
    rollback = summary["rollbacks"][0]
    assert rollback["succeeded"] and rollback["tier"] == "fast"
    assert rollback["target_epoch"] == 2 and rollback["target_step"] % 4 == 0, rollback
    assert summary["epochs_completed"] == 5


def test_a_rollback_to_a_snapshot_still_being_copied_waits_for_its_values(make_trainer: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever asks for the rollback (the protocol, a callback, a test), the target's tensors are
    read only once its copy-behind job has finished: a half-copied snapshot restores garbage."""
    import esper.tolaria.recovery.snapshot_copier as copier

    real_run = copier.CopyJob.run

    def slow_copy(job: Any) -> None:
        time.sleep(0.2)
        real_run(job)

    trainer, _ = make_trainer(small_config(**CALM, run={"epochs": 2}, snapshots={"copy_behind": True,
                                                                                  "capacity": 1}))
    trainer.safety.start(resumed=False)  # snapshot "before" holds the initial weights
    trainer.safety.settle()
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)  # training moved on (after the settle, as the contract asks)
    expected = state_checksum(trainer.model.state_dict())
    monkeypatch.setattr(copier.CopyJob, "run", slow_copy)
    target = trainer.safety.snapshots.take()  # recycles the old buffers; parameters copied over 0.2 s
    outcome = trainer.safety.coordinator.rollback(target, "fast")  # at once, while the copy runs
    assert outcome.succeeded, outcome.reason
    assert state_checksum(trainer.model.state_dict()) == expected
    trainer.close()


def test_a_rollback_lets_the_snapshot_being_copied_finish_before_it_writes_the_live_weights(
        make_trainer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The newest snapshot's copy-behind job reads the live tensors; a rollback to an older snapshot
    that wrote them first would leave the newest one half old, half new."""
    import esper.tolaria.recovery.snapshot_copier as copier

    real_run = copier.CopyJob.run

    def slow_copy(job: Any) -> None:
        time.sleep(0.2)
        real_run(job)

    trainer, _ = make_trainer(small_config(**CALM, run={"epochs": 2}, snapshots={"copy_behind": True}))
    trainer.safety.start(resumed=False)
    start = trainer.safety.snapshots.cache.last_healthy()
    trainer.safety.settle()
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    moved_on = state_checksum(trainer.model.state_dict())
    monkeypatch.setattr(copier.CopyJob, "run", slow_copy)
    newest = trainer.safety.snapshots.take()
    outcome = trainer.safety.coordinator.rollback(start, "fast")  # while `newest` is still being copied
    assert outcome.succeeded, outcome.reason
    newest.wait_ready()
    assert state_checksum(newest.state["model"]) == moved_on
    trainer.close()
