"""SnapshotCache bounds and rollback targets; restore_tensors_ restores bit-exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper.tolaria.recovery.snapshot_cache import (
    RestoreError,
    SnapshotCache,
    confirm_restored,
    restore_tensors_,
    sample_bits,
)
from esper.tolaria.state.snapshot import Snapshot, deep_clone, state_checksum


def _snap(sid: str, step: int, numel: int = 256) -> Snapshot:
    return Snapshot(snapshot_id=sid, epoch=step, global_step=step, state={"w": torch.zeros(numel)})


def test_lru_order_follows_use_and_evicts_the_least_recent() -> None:
    cache = SnapshotCache(capacity=3)
    for i in range(3):
        cache.put(_snap(f"s{i}", i))
    assert cache.get("s0") is not None
    cache.put(_snap("s3", 3))
    assert cache.ids() == ["s2", "s0", "s3"]
    assert cache.evictions_total == 1 and cache.events[-1].kind == "evicted" and cache.events[-1].snapshot_id == "s1"


def test_byte_cap_is_enforced_and_eviction_reported() -> None:
    per = 1024 * 4  # 1024 float32
    cache = SnapshotCache(capacity=10, max_bytes=3 * per)
    for i in range(5):
        assert cache.put(_snap(f"s{i}", i, 1024))
        assert cache.bytes_used <= cache.max_bytes
    assert cache.ids() == ["s2", "s3", "s4"]
    stats = cache.stats()
    assert stats["evictions_total"] == 2 and stats["bytes_used"] == 3 * per
    assert [e["snapshot_id"] for e in stats["events"]] == ["s0", "s1"]
    assert "bytes cap" in stats["events"][0]["reason"]


def test_oversize_snapshot_is_refused_and_reported_not_inserted() -> None:
    cache = SnapshotCache(capacity=5, max_bytes=4096)
    assert cache.put(_snap("small", 1, 16))
    assert not cache.put(_snap("huge", 2, 100_000))
    assert "huge" not in cache and cache.ids() == ["small"]
    assert cache.refused_total == 1 and cache.bytes_used == 64
    event = cache.stats()["events"][-1]
    assert event["kind"] == "refused" and "over the cache's max_bytes=4096" in event["reason"]


def test_last_healthy_ignores_unhealthy_and_respects_before_step() -> None:
    cache = SnapshotCache(capacity=5)
    for i in (10, 20, 30):
        cache.put(_snap(f"s{i}", i))
    assert cache.last_healthy() is None
    cache.mark_healthy("s10")
    cache.mark_healthy("s20")
    healthy = cache.last_healthy()
    assert healthy is not None and healthy.snapshot_id == "s20"
    before = cache.last_healthy(before_step=20)
    assert before is not None and before.snapshot_id == "s10"
    assert cache.last_healthy(before_step=10) is None
    assert not cache.mark_healthy("missing")


def test_eviction_spares_the_only_rollback_target() -> None:
    cache = SnapshotCache(capacity=2)
    cache.put(_snap("good", 1))
    cache.mark_healthy("good")
    cache.put(_snap("fresh1", 2))
    cache.put(_snap("fresh2", 3))
    assert cache.ids() == ["good", "fresh2"]
    target = cache.last_healthy()
    assert target is not None and target.snapshot_id == "good"


def test_reinserting_an_id_replaces_it_without_double_counting_bytes() -> None:
    cache = SnapshotCache(capacity=3)
    cache.put(_snap("a", 1, 100))
    cache.put(_snap("a", 1, 50))
    assert len(cache) == 1 and cache.bytes_used == 200


def _trained_mlp() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
    return model, opt


def _live(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, object]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict()["state"]}


def test_restore_tensors_restores_params_and_adam_state_bit_exactly() -> None:
    model, opt = _trained_mlp()
    snap = deep_clone(_live(model, opt))
    expected = state_checksum(snap)
    for _ in range(2):  # train on: params, moments and step all move away
        opt.zero_grad()
        model(torch.randn(8, 16)).sum().backward()
        opt.step()
    assert state_checksum(_live(model, opt)) != expected
    result = restore_tensors_(_live(model, opt), snap)
    assert state_checksum(_live(model, opt)) == expected
    assert result.tensors == 4 + 4 * 3 and result.fallback == 0


def test_restore_falls_back_per_tensor_when_dtypes_differ() -> None:
    live = {"a": torch.zeros(5), "b": torch.zeros(3, dtype=torch.float64)}
    snap = {"a": torch.arange(5.0), "b": torch.arange(3, dtype=torch.float32)}
    result = restore_tensors_(live, snap)
    assert result.foreach == 1 and result.fallback == 1
    assert torch.equal(live["a"], snap["a"]) and torch.equal(live["b"], snap["b"].double())


def test_restore_refuses_mismatched_structure_and_copies_nothing() -> None:
    live = {"a": torch.zeros(4), "b": torch.zeros(2)}
    with pytest.raises(RestoreError, match="only snapshot: \\['c'\\]"):
        restore_tensors_(live, {"a": torch.ones(4), "c": torch.ones(2)})
    with pytest.raises(RestoreError, match="'b' is \\(2,\\) live but \\(3,\\)"):
        restore_tensors_(live, {"a": torch.ones(4), "b": torch.ones(3)})
    assert not live["a"].any()


def test_sample_bits_sees_a_single_bit_flip_on_a_sampled_element() -> None:
    t = torch.randn(5000)
    before = sample_bits(t)
    t.view(torch.int32)[714 * 3] ^= 1  # a sampled element: 5000 elements, 8 samples, step 714
    assert not torch.equal(before, sample_bits(t))
    nan = torch.full((4,), float("nan"))
    assert torch.equal(sample_bits(nan), sample_bits(nan.clone()))


def test_restore_reports_a_copy_that_did_not_take_effect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: None)
    with pytest.raises(RestoreError, match="did not take effect: tensor #0 \\(4,\\) was not written"):
        restore_tensors_({"a": torch.zeros(4)}, {"a": torch.ones(4)})


def test_confirm_catches_written_but_wrong_contents() -> None:
    dst, src = [torch.zeros(100), torch.zeros(10)], [torch.ones(100), torch.ones(10)]
    versions = [t._version for t in dst]
    dst[0].fill_(2.0)  # written, but not from the snapshot
    dst[1].copy_(src[1])
    assert "tensor #0 (100,) differs" in confirm_restored(dst, src, versions)
    dst[0].copy_(src[0])
    assert confirm_restored(dst, src, versions) == ""


def test_restore_handles_non_contiguous_live_tensors_bit_exactly() -> None:
    base = torch.zeros(6, 4)
    live = {"w": base.t()}  # a transposed view: not contiguous
    snap = {"w": torch.arange(24.0).reshape(4, 6)}
    restore_tensors_(live, snap)
    assert torch.equal(base.t(), snap["w"])


def _state(value: float) -> dict[str, object]:
    return {"model": {"w": torch.full((64, 8), value), "b": torch.full((8,), value)}, "trainer": {"step": int(value)}}


def _ptrs(snap: Snapshot) -> set[int]:
    model = snap.state["model"]
    return {model["w"].data_ptr(), model["b"].data_ptr()}


def test_take_recycles_the_buffers_of_an_evicted_snapshot_nobody_holds() -> None:
    cache = SnapshotCache(capacity=1, recycle=True)
    first = cache.take("s1", 1, 1, _state(1.0))
    assert first is not None
    old_ptrs = _ptrs(first)
    del first
    cache.take("s2", 2, 2, _state(2.0))  # evicts s1 into the spare
    third = cache.take("s3", 3, 3, _state(3.0))
    assert third is not None and cache.recycled_total == 1
    assert _ptrs(third) == old_ptrs
    assert state_checksum(third.state) == state_checksum(_state(3.0))


def test_take_never_overwrites_an_evicted_snapshot_someone_still_holds() -> None:
    cache = SnapshotCache(capacity=1, recycle=True)
    held = cache.take("s1", 1, 1, _state(1.0))  # e.g. an async checkpoint writer still has it
    assert held is not None
    cache.take("s2", 2, 2, _state(2.0))
    cache.take("s3", 3, 3, _state(3.0))
    assert cache.recycled_total == 0
    assert state_checksum(held.state) == state_checksum(_state(1.0))


def test_take_never_overwrites_a_held_tensor_of_an_evicted_snapshot() -> None:
    cache = SnapshotCache(capacity=1, recycle=True)
    snap = cache.take("s1", 1, 1, _state(1.0))
    assert snap is not None
    weight = snap.state["model"]["w"]
    del snap
    cache.take("s2", 2, 2, _state(2.0))
    cache.take("s3", 3, 3, _state(3.0))
    assert cache.recycled_total == 0 and bool((weight == 1.0).all())


def test_take_refuses_an_oversize_state_without_cloning_it() -> None:
    cache = SnapshotCache(capacity=2, max_bytes=100)
    assert cache.take("big", 0, 0, _state(1.0)) is None
    assert cache.refused_total == 1 and len(cache) == 0
