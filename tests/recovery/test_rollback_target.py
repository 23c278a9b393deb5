"""Which snapshot a rollback restores: exactly the newest one proven healthy, never an unproven or
later one, and the cache never gives up that target while it can evict something else."""

from __future__ import annotations

import pytest
import torch

from esper.tolaria.recovery.snapshot_cache import SnapshotCache
from esper.tolaria.state.snapshot import Snapshot


def _snap(sid: str, step: int, *, created_ns: int | None = None, numel: int = 16) -> Snapshot:
    snap = Snapshot(snapshot_id=sid, epoch=step // 10, global_step=step, state={"w": torch.zeros(numel)})
    if created_ns is not None:
        snap.created_ns = created_ns
    return snap


def _cache(*snaps: Snapshot, healthy: tuple[str, ...] = (), capacity: int = 8) -> SnapshotCache:
    cache = SnapshotCache(capacity=capacity, max_bytes=1 << 20)
    for snap in snaps:
        assert cache.put(snap)
    for sid in healthy:
        assert cache.mark_healthy(sid)
    return cache


def test_the_target_is_the_newest_healthy_by_step_not_by_insertion_or_use() -> None:
    cache = _cache(_snap("s30", 30), _snap("s10", 10), _snap("s20", 20), healthy=("s30", "s10", "s20"))
    assert cache.get("s10") is not None  # the most recently used is not the newest
    target = cache.last_healthy()
    assert target is not None and target.snapshot_id == "s30"
    assert cache.ids()[-1] == "s10"  # choosing a target does not reorder the LRU


def test_an_unproven_snapshot_is_never_the_target_even_when_newest() -> None:
    cache = _cache(_snap("s10", 10), _snap("s20", 20), healthy=("s10",))
    target = cache.last_healthy()
    assert target is not None and target.snapshot_id == "s10"
    assert _cache(_snap("s10", 10)).last_healthy() is None  # nothing proven: no fast rollback at all


def test_a_step_reached_again_after_a_rollback_targets_its_later_snapshot() -> None:
    first = _snap("s20-first", 20, created_ns=1_000)
    again = _snap("s20-again", 20, created_ns=2_000)
    cache = _cache(again, first, healthy=("s20-first", "s20-again"))
    target = cache.last_healthy()
    assert target is not None and target.snapshot_id == "s20-again"


@pytest.mark.parametrize(("before_step", "expected"), [(None, "s30"), (31, "s30"), (30, "s20"), (21, "s20"),
                                                       (20, "s10"), (10, None)])
def test_a_target_before_a_step_is_taken_strictly_before_it(before_step: int | None, expected: str | None) -> None:
    cache = _cache(_snap("s10", 10), _snap("s20", 20), _snap("s30", 30), healthy=("s10", "s20", "s30"))
    target = cache.last_healthy(before_step)
    assert (None if target is None else target.snapshot_id) == expected


def test_marking_an_absent_snapshot_healthy_changes_no_target() -> None:
    cache = _cache(_snap("s10", 10), healthy=("s10",))
    assert cache.mark_healthy("gone") is False
    target = cache.last_healthy()
    assert target is not None and target.snapshot_id == "s10"


def test_eviction_spares_the_target_and_takes_the_least_recent_unproven_one() -> None:
    cache = _cache(_snap("s10", 10), _snap("s20", 20), _snap("s30", 30), healthy=("s10",), capacity=3)
    cache.put(_snap("s40", 40))
    assert cache.ids() == ["s10", "s30", "s40"]  # s20 went, not the older s10 that is the target
    target = cache.last_healthy()
    assert target is not None and target.snapshot_id == "s10"
    assert [(e.kind, e.snapshot_id) for e in cache.events] == [("evicted", "s20")]
    assert cache.events[0].reason == "evicted least recently used snapshot over the count cap"


def test_the_byte_cap_also_spares_the_target() -> None:
    per = 16 * 4
    cache = SnapshotCache(capacity=8, max_bytes=2 * per)
    cache.put(_snap("s10", 10))
    cache.mark_healthy("s10")
    cache.put(_snap("s20", 20))
    cache.put(_snap("s30", 30))
    assert cache.ids() == ["s10", "s30"] and cache.bytes_used == 2 * per
    assert cache.events[-1].reason == "evicted least recently used snapshot over the bytes cap"


def test_a_full_cache_of_one_keeps_the_new_snapshot_over_the_old_target() -> None:
    # with no other candidate the cap still holds: the newcomer stays, the old target goes
    cache = _cache(_snap("s10", 10), healthy=("s10",), capacity=1)
    cache.put(_snap("s20", 20))
    assert cache.ids() == ["s20"] and cache.last_healthy() is None
