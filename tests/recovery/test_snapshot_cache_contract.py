"""The snapshot cache's bookkeeping: copies kept outside it, clearing, the stats the summary reads,
and recycling through nested lists."""

from __future__ import annotations

import torch

from esper.tolaria.recovery.snapshot_cache import SnapshotCache
from esper.tolaria.state.snapshot import Snapshot


def _state(value: float = 0.0) -> dict[str, object]:
    return {"model": {"w": torch.full((4,), value)}, "optimizer": {"moments": [torch.zeros(2), torch.ones(3)]}}


def test_a_copy_kept_outside_the_cache_carries_its_identity_and_size() -> None:
    cache = SnapshotCache(capacity=2, max_bytes=1 << 20)
    copy = cache.copy_out("stop-7", 3, 70, _state(7.0))
    assert (copy.snapshot_id, copy.epoch, copy.global_step, copy.nbytes) == ("stop-7", 3, 70, (4 + 2 + 3) * 4)
    assert torch.equal(copy.state["model"]["w"], torch.full((4,), 7.0))
    assert "stop-7" not in cache and cache.bytes_used == 0
    cache.close()


def test_clearing_empties_the_cache_and_its_byte_count() -> None:
    cache = SnapshotCache(capacity=1, max_bytes=1 << 20, recycle=True)
    cache.take("a", 0, 1, _state())
    cache.take("b", 0, 2, _state())  # evicts a into the spare
    cache.clear()
    assert len(cache) == 0 and cache.bytes_used == 0 and cache.ids() == []
    assert cache.last_healthy() is None
    cache.take("c", 0, 3, _state())
    assert cache.recycled_total == 0  # the spare went with the clear
    cache.close()


def test_stats_report_counts_caps_and_copy_behind_totals() -> None:
    cache = SnapshotCache(capacity=2, max_bytes=100)
    cache.put(Snapshot(snapshot_id="a", epoch=0, global_step=1, state={"w": torch.zeros(4)}))
    cache.mark_healthy("a")
    cache.put(Snapshot(snapshot_id="big", epoch=0, global_step=2, state={"w": torch.zeros(100)}))
    stats = cache.stats()
    assert {k: v for k, v in stats.items() if k != "events"} == {
        "count": 1, "capacity": 2, "bytes_used": 16, "max_bytes": 100, "healthy": 1, "evictions_total": 0,
        "refused_total": 1, "copied_behind": {"jobs": 0, "bytes": 0}, "snapshot_gpu_bytes": 0,
    }
    assert [e["kind"] for e in stats["events"]] == ["refused"]
    cache.close()


def test_a_snapshot_holding_lists_of_tensors_is_recycled_into() -> None:
    cache = SnapshotCache(capacity=1, max_bytes=1 << 20, recycle=True)
    cache.take("a", 0, 1, _state(1.0))
    cache.take("b", 0, 2, _state(2.0))  # a is evicted and becomes the spare
    third = cache.take("c", 0, 3, _state(3.0))
    assert cache.recycled_total == 1
    assert third is not None and torch.equal(third.state["optimizer"]["moments"][1], torch.ones(3))
    assert torch.equal(third.state["model"]["w"], torch.full((4,), 3.0))
    cache.close()
