"""The snapshot cache's copies and counts: what is copied behind and into which buffers, the shape
of what comes back, the constructor's refusals, refusal events, and how a memory-following cap grows."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from esper.tolaria.config import SnapshotConfig
from esper.tolaria.recovery import snapshot_copier
from esper.tolaria.recovery.host_memory import BASE_CAP_BYTES
from esper.tolaria.recovery.snapshot_cache import MAX_EVENTS, SnapshotCache, copy_behind_rule
from esper.tolaria.state.snapshot import Snapshot, SnapshotCopyError


def _fake(sid: str, nbytes: int, step: int = 1) -> Snapshot:
    # nbytes given: the cache's bookkeeping reads it, so a tiny state stands for a huge one
    return Snapshot(snapshot_id=sid, epoch=0, global_step=step, state={"w": torch.zeros(1)}, nbytes=nbytes)


def _always(section: str, tensor: torch.Tensor) -> bool:
    return True


# copy_behind_rule: parameters and optimizer state behind, buffers at once

def test_the_copy_behind_rule_defers_parameters_and_optimizer_state_but_not_buffers() -> None:
    model = torch.nn.BatchNorm1d(3)
    rule = copy_behind_rule(model)
    assert model.running_mean is not None
    assert rule("model", model.weight)
    assert not rule("model", model.running_mean)
    assert rule("optimizer", torch.zeros(2))
    assert not rule("rng", model.weight)  # a parameter's storage outside the model section: at once


# which tensors the cache copies behind, through dicts and lists

def test_optimizer_tensors_in_lists_are_copied_behind_and_arrive_whole() -> None:
    model = torch.nn.Linear(2, 2)
    state = {"model": model.state_dict(), "optimizer": {"moments": [torch.full((3,), 5.0), torch.ones(4)]}}
    cache = SnapshotCache(capacity=2, max_bytes=1 << 20)
    snap = cache.take("a", 0, 1, state, defer=copy_behind_rule(model))
    cache.settle()
    assert snap is not None
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert cache.stats()["copied_behind"]["bytes"] == param_bytes + (3 + 4) * 4
    assert torch.equal(snap.state["optimizer"]["moments"][0], torch.full((3,), 5.0))
    assert torch.equal(snap.state["optimizer"]["moments"][1], torch.ones(4))
    cache.close()


def test_a_tensor_copied_behind_does_not_require_grad() -> None:
    cache = SnapshotCache(capacity=2, max_bytes=1 << 20)
    snap = cache.take("a", 0, 1, {"optimizer": {"p": torch.nn.Parameter(torch.ones(3))}}, defer=_always)
    cache.settle()
    assert snap is not None and not snap.state["optimizer"]["p"].requires_grad
    cache.close()


def test_tensors_copied_behind_reuse_the_evicted_snapshots_buffers() -> None:
    cache = SnapshotCache(capacity=1, max_bytes=1 << 20, recycle=True)
    first = cache.take("a", 0, 1, {"optimizer": {"m": torch.zeros(8)}}, defer=_always)
    assert first is not None
    cache.settle()
    old_ptr = first.state["optimizer"]["m"].data_ptr()
    del first
    cache.take("b", 0, 2, {"optimizer": {"m": torch.zeros(8)}}, defer=_always)  # a becomes the spare
    third = cache.take("c", 0, 3, {"optimizer": {"m": torch.full((8,), 3.0)}}, defer=_always)
    cache.settle()
    assert third is not None and cache.recycled_total == 1
    assert third.state["optimizer"]["m"].data_ptr() == old_ptr
    assert torch.equal(third.state["optimizer"]["m"], torch.full((8,), 3.0))
    cache.close()


def test_tensors_inside_lists_are_copied_into_the_spares_list_buffers() -> None:
    cache = SnapshotCache(capacity=1, max_bytes=1 << 20, recycle=True)
    first = cache.take("a", 0, 1, {"optimizer": {"moments": [torch.zeros(2), torch.zeros(3)]}})
    assert first is not None
    old_ptrs = [t.data_ptr() for t in first.state["optimizer"]["moments"]]
    del first
    cache.take("b", 0, 2, {"optimizer": {"moments": [torch.zeros(2), torch.zeros(3)]}})
    third = cache.take("c", 0, 3, {"optimizer": {"moments": [torch.ones(2), torch.ones(3)]}})
    assert third is not None and cache.recycled_total == 1
    assert [t.data_ptr() for t in third.state["optimizer"]["moments"]] == old_ptrs
    cache.close()


def test_lists_stay_lists_and_tuples_stay_tuples_in_a_snapshot() -> None:
    cache = SnapshotCache(capacity=2, max_bytes=1 << 20)
    snap = cache.take("a", 0, 1, {"optimizer": {"betas": (0.9, 0.999), "moments": [torch.zeros(2)]}})
    assert snap is not None
    assert snap.state["optimizer"]["betas"] == (0.9, 0.999)
    assert isinstance(snap.state["optimizer"]["moments"], list)
    cache.close()


def test_settle_after_a_reader_waited_for_the_copy_is_a_no_op() -> None:
    cache = SnapshotCache(capacity=2, max_bytes=1 << 20)
    snap = cache.take("a", 0, 1, {"optimizer": {"m": torch.ones(4)}}, defer=_always)
    assert snap is not None and cache.filling
    snap.wait_ready()  # e.g. the checkpoint writer read it first
    cache.settle()
    assert not cache.filling and "a" in cache
    cache.close()


# the constructor's refusals and the event log's bound

def test_a_cache_refuses_a_capacity_or_byte_budget_below_one_naming_the_value() -> None:
    with pytest.raises(ValueError, match="capacity=0"):
        SnapshotCache(capacity=0)
    with pytest.raises(ValueError, match="max_bytes=0"):
        SnapshotCache(max_bytes=0)
    assert SnapshotCache(capacity=1, max_bytes=1).max_bytes == 1  # one byte is a (tiny) budget


def test_a_cache_built_without_a_capacity_keeps_as_many_as_the_config_default() -> None:
    assert SnapshotCache().capacity == SnapshotConfig().capacity


def test_the_event_log_keeps_only_the_newest_events() -> None:
    cache = SnapshotCache(capacity=1, max_bytes=10)
    for i in range(MAX_EVENTS + 5):
        cache.put(_fake(f"s{i}", 11, step=i))
    assert cache.refused_total == MAX_EVENTS + 5
    assert len(cache.events) == MAX_EVENTS and cache.events[-1].snapshot_id == f"s{MAX_EVENTS + 4}"


# refusals: counted, logged, and reported with the snapshot's identity and size

def test_a_put_refusal_reports_the_snapshot_and_a_snapshot_of_exactly_the_cap_fits(
        caplog: pytest.LogCaptureFixture) -> None:
    cache = SnapshotCache(capacity=2, max_bytes=100)
    assert cache.put(_fake("fits", 100))
    with caplog.at_level(logging.WARNING):
        assert not cache.put(_fake("big", 101, step=7))
        assert not cache.put(_fake("bigger", 300, step=8))
    assert cache.refused_total == 2
    event = cache.events[0]
    assert (event.kind, event.snapshot_id, event.global_step, event.nbytes) == ("refused", "big", 7, 101)
    assert "max_bytes=100" in caplog.text and "snapshot big holds 101 bytes" in caplog.text
    cache.close()


def test_a_take_refusal_reports_the_snapshot_and_a_state_of_exactly_the_cap_fits() -> None:
    cache = SnapshotCache(capacity=2, max_bytes=16)
    snap = cache.take("fits", 3, 30, {"w": torch.zeros(4)})
    assert snap is not None and (snap.epoch, snap.global_step) == (3, 30)
    assert cache.take("big", 4, 40, {"w": torch.zeros(5)}) is None
    event = cache.events[0]
    assert (event.snapshot_id, event.global_step, event.nbytes) == ("big", 40, 20)
    cache.close()


def test_every_recycled_spare_is_counted() -> None:
    cache = SnapshotCache(capacity=1, max_bytes=1 << 20, recycle=True)
    for i in range(4):
        cache.take(f"s{i}", 0, i, {"w": torch.zeros(4)})
    assert cache.recycled_total == 2  # s2 into s0's buffers, s3 into s1's
    cache.close()


# a memory-following cap: grown to the room the host has plus what the cache already holds

def test_a_cap_that_already_holds_two_snapshots_does_not_read_host_memory() -> None:
    def unread() -> int:
        raise AssertionError("host memory read for a snapshot the cap already holds twice")

    cache = SnapshotCache(capacity=5, available=unread)
    assert cache.put(_fake("half", BASE_CAP_BYTES // 2))
    assert cache.put(_fake("over-a-third", BASE_CAP_BYTES // 3 + 1))
    assert cache.max_bytes == BASE_CAP_BYTES


def test_a_grown_cap_counts_the_snapshots_held_as_room() -> None:
    cache = SnapshotCache(capacity=5, available=lambda: BASE_CAP_BYTES)
    assert cache.put(_fake("small", 100))
    cache.put(_fake("huge", BASE_CAP_BYTES, step=2))
    assert cache.max_bytes == BASE_CAP_BYTES + 100


def test_a_grown_cap_counts_the_recycling_spare_as_room() -> None:
    cache = SnapshotCache(capacity=1, recycle=True, available=lambda: BASE_CAP_BYTES)
    cache.put(_fake("a", 100))
    cache.put(_fake("b", 200, step=2))  # a is evicted into the spare
    cache.put(_fake("huge", BASE_CAP_BYTES, step=3))
    assert cache.max_bytes == BASE_CAP_BYTES + 300


def test_a_copy_behind_that_misses_the_settle_deadline_loses_its_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real_copy = torch._foreach_copy_

    def held_copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        gate.wait(5.0)  # released after the settle below gave up; the bound keeps a broken settle finite
        real_copy(dst, src)

    monkeypatch.setattr(snapshot_copier.torch, "_foreach_copy_", held_copy)
    cache = SnapshotCache(capacity=2, max_bytes=1 << 20)
    cache.take("slow", 0, 1, {"optimizer": {"m": torch.ones(4)}}, defer=_always)
    with pytest.raises(SnapshotCopyError, match="did not finish within 0.05 s"):
        cache.settle(timeout=0.05)
    gate.set()
    assert "slow" not in cache
    cache.close()


def test_an_unproven_snapshot_older_in_use_order_does_not_hide_the_target() -> None:
    cache = SnapshotCache(capacity=3, max_bytes=1 << 20)
    cache.put(_fake("unproven", 4, step=1))
    cache.put(_fake("proven", 4, step=2))
    cache.mark_healthy("proven")
    target = cache.last_healthy()
    assert target is not None and target.snapshot_id == "proven"


def test_an_eviction_names_the_cap_that_forced_it() -> None:
    cache = SnapshotCache(capacity=2, max_bytes=100)
    cache.put(_fake("a", 60, step=1))
    cache.put(_fake("b", 60, step=2))  # 120 bytes with room for two snapshots: the byte cap
    cache.put(_fake("c", 10, step=3))
    cache.put(_fake("d", 10, step=4))  # three snapshots, 80 bytes: the count cap
    assert [(e.snapshot_id, e.global_step, e.nbytes, e.reason.rsplit(" ", 2)[-2]) for e in cache.events] == [
        ("a", 1, 60, "bytes"), ("b", 2, 60, "count")]
