"""Snapshots live in host memory: every buffer on the CPU (pinned for a CUDA model), none in GPU
memory; a buffer is recycled only once its copy is done; the checkpoint writer and the healthy
check read host buffers only once they hold their values; a snapshot over the cap is a host copy
made behind, like a cached one; the default cap follows host memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from esper.tolaria.checkpoint import CheckpointStore, recover
from esper.tolaria.config import SnapshotConfig
from esper.tolaria.observe.profiling import Profiler
from esper.tolaria.observe.timing import MonotonicTimer
from esper.tolaria.recovery.host_memory import BASE_CAP_BYTES, available_host_bytes
from esper.tolaria.recovery.restore_plan import RestorePlan
from esper.tolaria.recovery.snapshot_cache import (
    SnapshotCache,
    confirm_restored,
    copy_behind_rule,
    copy_in_place_,
    flatten_tensors,
    restore_tensors_,
)
from esper.tolaria.recovery.snapshots import Snapshots
from esper.tolaria.state.position import TrainerState
from esper.tolaria.state.registry import StateRegistry
from esper.tolaria.state.snapshot import Snapshot, deep_clone, state_checksum

GIB = 1024**3


def _trained(device: str = "cpu") -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4)).to(device)
    optimizer = torch.optim.Adam(model.named_parameters(), lr=1e-2)  # groups name their parameters
    _step(model, optimizer)
    return model, optimizer


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    device = next(model.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    model(torch.randn(8, 16, device=device)).square().mean().backward()
    optimizer.step()


def _live(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()["state"]}


def _by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Shaped like a trainer snapshot: optimizer state keyed by parameter name (RestorePlan's input)."""
    return {"model": model.state_dict(),
            "optimizer": {"state": {n: optimizer.state[p] for n, p in model.named_parameters()}}}


class _HeldJob:
    """A copy job whose copy is still in flight (as a CUDA job is after `wait()`): its buffers get
    their values only at `synchronize()`."""

    def __init__(self, fill: dict[str, torch.Tensor] | None = None) -> None:
        self.nbytes, self.fill, self.synchronized = 0, fill or {}, False

    def wait(self, timeout: float | None = None) -> None:
        """Orders the stream; the host buffers are not written yet."""

    def synchronize(self, timeout: float | None = None) -> None:
        for t in self.fill.values():
            t.fill_(7.0)
        self.fill, self.synchronized = {}, True  # a finished job lets go of its tensors

    def done(self) -> bool:
        return self.synchronized


def test_a_snapshot_holds_every_buffer_on_the_host_and_none_on_a_gpu() -> None:
    model, optimizer = _trained()
    cache = SnapshotCache(capacity=2, recycle=True)
    for i in range(3):
        cache.take(f"s{i}", 0, i, _live(model, optimizer), defer=copy_behind_rule(model))
        cache.settle()
    assert cache.snapshot_gpu_bytes == 0 and cache.stats()["snapshot_gpu_bytes"] == 0
    held = [s.state for s in map(cache.peek, cache.ids()) if s is not None]
    assert held and all(t.is_cpu for state in held for t in flatten_tensors(state).values())
    cache.close()


def test_a_spare_is_recycled_only_once_its_copy_is_done() -> None:
    cache = SnapshotCache(capacity=1, recycle=True)
    first = Snapshot("s1", 0, 1, {"w": torch.zeros(64)})
    ptr = first.state["w"].data_ptr()
    job = _HeldJob({"w": first.state["w"]})
    first.ready = job
    cache.put(first)
    del first
    cache.put(Snapshot("s2", 0, 2, {"w": torch.zeros(64)}))  # s1 becomes the spare, its copy in flight
    third = cache.take("s3", 0, 3, {"w": torch.full((64,), 3.0)})
    assert job.synchronized  # its copy finished before its buffer was written again
    assert third is not None and third.state["w"].data_ptr() == ptr
    assert bool((third.state["w"] == 3.0).all())


def test_settle_keeps_an_unfinished_job_for_the_host_readers() -> None:
    cache = SnapshotCache(capacity=2)
    snapshot = cache.take("s", 0, 0, {"w": torch.zeros(8)})
    assert snapshot is not None
    job = _HeldJob({"w": snapshot.state["w"]})
    snapshot.ready, cache._filling = job, snapshot
    cache.settle()  # the training thread is ordered after the copy; the copy may still run
    assert snapshot.ready is job and not cache.filling
    snapshot.wait_ready()
    assert snapshot.ready is None and bool((snapshot.state["w"] == 7.0).all())


def test_the_checkpoint_writer_reads_a_snapshot_only_once_its_host_copy_is_complete(tmp_path: Path) -> None:
    weight = torch.zeros(16)
    snapshot = Snapshot("s", 0, 5, {"model": {"w": weight}, "trainer": {"step": 5}})
    snapshot.ready = _HeldJob({"w": weight})
    store = CheckpointStore(tmp_path / "ckpt", fsync=False)
    store.save_async(snapshot).result(timeout=30)
    store.close()
    found = recover(tmp_path / "ckpt", clean=False).checkpoint
    assert found is not None
    assert bool((found.snapshot().state["model"]["w"] == 7.0).all())


def _snapshots(model: nn.Module, optimizer: torch.optim.Optimizer, config: SnapshotConfig) -> Snapshots:
    registry = StateRegistry()
    registry.register("model", model)
    registry.register("optimizer", optimizer)
    return Snapshots(config, registry=registry, model=model, optimizer=lambda: optimizer, position=TrainerState(),
                     profiler=Profiler(False), timer=MonotonicTimer({}), events=lambda *a, **k: None)


def test_a_snapshot_over_the_cap_is_a_host_copy_made_behind_like_a_cached_one() -> None:
    model, optimizer = _trained()
    snapshots = _snapshots(model, optimizer, SnapshotConfig(max_mb=1e-3))
    expected = state_checksum(deep_clone({"model": model.state_dict(), "optimizer": optimizer.state_dict()}))
    snapshot = snapshots.take()
    assert snapshots.cache.refused_total == 1 and len(snapshots.cache) == 0
    assert snapshots.cache.filling  # parameters and Adam state copied behind, not cloned at once
    snapshots.settle()
    _step(model, optimizer)
    assert state_checksum(snapshot.state) == expected
    snapshots.close()


def test_a_window_proves_a_snapshot_healthy_from_its_finished_host_copy() -> None:
    """The healthy check reads the snapshot's host buffers: only once their copy is complete (here
    the copy brings a NaN, which the check must see)."""
    model, optimizer = _trained()
    snapshots = _snapshots(model, optimizer, SnapshotConfig())
    snapshot = snapshots.take()
    snapshots.settle()
    weight = snapshot.state["model"]["0.weight"]
    job = _HeldJob({"w": weight})
    job.synchronize = lambda timeout=None: (weight.fill_(float("nan")), setattr(job, "synchronized", True))
    snapshot.ready = job
    assert not snapshots.close_window()
    assert job.synchronized and not snapshot.healthy
    snapshots.close()


def test_the_cap_follows_host_memory_only_when_max_mb_is_left_unset() -> None:
    model, optimizer = _trained()
    assert _snapshots(model, optimizer, SnapshotConfig()).cache._available is not None
    fixed = _snapshots(model, optimizer, SnapshotConfig(max_mb=2048.0)).cache
    assert fixed._available is None and fixed.max_bytes == 2048 * 2**20


def _meminfo(tmp_path: Path, available_gib: float) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       67108864 kB\nMemFree:        1024 kB\n"
                    f"MemAvailable:   {int(available_gib * GIB / 1024)} kB\n")
    return path


def _big(sid: str, step: int, gib: float) -> Snapshot:
    return Snapshot(sid, 0, step, {"w": torch.zeros(1)}, nbytes=int(gib * GIB))


def test_available_memory_is_read_from_meminfo(tmp_path: Path) -> None:
    assert available_host_bytes(_meminfo(tmp_path, 3.5)) == int(3.5 * GIB / 1024) * 1024
    assert available_host_bytes(tmp_path / "absent") > 0  # sysconf's reading instead


def test_the_default_cap_keeps_two_snapshots_that_fit_twice_in_host_memory(tmp_path: Path) -> None:
    meminfo = _meminfo(tmp_path, 16)
    cache = SnapshotCache(capacity=5, available=lambda: available_host_bytes(meminfo))
    for i in range(4):
        assert cache.put(_big(f"s{i}", i, 1.5))  # 3 GiB for two: over the fixed 2 GiB
    assert cache.ids() == ["s2", "s3"] and cache.max_bytes == 3 * GIB


def test_the_default_cap_keeps_one_snapshot_when_host_memory_holds_only_one(tmp_path: Path) -> None:
    meminfo = _meminfo(tmp_path, 0.25)
    cache = SnapshotCache(capacity=5, available=lambda: available_host_bytes(meminfo))
    for i in range(3):
        assert cache.put(_big(f"s{i}", i, 1.5))
    assert cache.ids() == ["s2"] and cache.max_bytes < 3 * GIB


def test_an_explicit_cap_is_kept_and_memory_is_not_read() -> None:
    def unread() -> int:
        raise AssertionError("an explicit max_bytes must not read host memory")

    cache = SnapshotCache(capacity=5, max_bytes=BASE_CAP_BYTES, available=unread)
    for i in range(3):
        assert cache.put(_big(f"s{i}", i, 1.5))
    assert cache.ids() == ["s2"] and cache.max_bytes == BASE_CAP_BYTES


# ---------------------------------------------------------------------- on CUDA


@pytest.mark.gpu
def test_a_snapshot_of_a_cuda_model_takes_no_gpu_memory() -> None:
    model, optimizer = _trained("cuda")
    cache = SnapshotCache(capacity=2, recycle=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for i in range(4):  # the fourth goes into the first one's buffers
        snapshot = cache.take(f"s{i}", 0, i, _live(model, optimizer), defer=copy_behind_rule(model))
        cache.settle()
        assert snapshot is not None
        snapshot.wait_ready()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert cache.snapshot_gpu_bytes == 0 and cache.recycled_total >= 1
    tensors = flatten_tensors(snapshot.state)
    assert all(t.is_cpu for t in tensors.values())
    assert all(t.is_pinned() for k, t in tensors.items() if not k.endswith(".step"))
    assert state_checksum(snapshot.state) == state_checksum(_live(model, optimizer))
    cache.close()


@pytest.mark.gpu
def test_a_cuda_snapshot_and_its_settle_never_synchronize_the_host() -> None:
    model, optimizer = _trained("cuda")
    cache = SnapshotCache(capacity=2, recycle=True)
    for i in range(3):  # from here on a finished spare's pinned buffers receive each snapshot
        warm = cache.take(f"w{i}", 0, i, _live(model, optimizer), defer=copy_behind_rule(model))
        cache.settle()
        assert warm is not None
        warm.wait_ready()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cache.take("s", 0, 9, _live(model, optimizer), defer=copy_behind_rule(model))
        cache.settle()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cache.recycled_total == 1  # the snapshot above went into w0's buffers
    cache.close()


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["by name", "planned"])
def test_a_rollback_on_cuda_restores_bit_exactly_from_host_memory(path: str) -> None:
    model, optimizer = _trained("cuda")
    cache = SnapshotCache(capacity=2)
    snapshot = cache.take("s", 0, 1, _by_name(model, optimizer), defer=copy_behind_rule(model))
    assert snapshot is not None
    plan = RestorePlan.build(model, optimizer, snapshot.state)
    expected = state_checksum(_by_name(model, optimizer))
    cache.settle()
    for _ in range(3):
        _step(model, optimizer)
    assert state_checksum(_by_name(model, optimizer)) != expected
    snapshot.wait_ready()
    if path == "planned":
        assert plan is not None
        pairs = plan.resolve(optimizer)
        assert pairs is not None
        versions = copy_in_place_(*pairs)
        assert confirm_restored(*pairs, versions) == ""
    else:
        live = _by_name(model, optimizer)
        result = restore_tensors_({"model": live["model"], "optimizer": live["optimizer"]["state"]},
                                  {"model": snapshot.state["model"], "optimizer": snapshot.state["optimizer"]["state"]})
        assert result.fallback == 0  # host to CUDA on the stream, Adam's CPU step counts in place
    assert state_checksum(_by_name(model, optimizer)) == expected
    cache.close()
