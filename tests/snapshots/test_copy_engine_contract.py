"""The copy-engine contract (recovery/copy_engine.py), checked on both engines: the CPU thread
(the stand-in, here) and the CUDA stream engine (`gpu`): copies complete at `wait()` in the
training thread's order, later writes to the source never reach the copy, failures surface at
`wait()`, jobs run in order, and a job holds its tensors until it is done."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from esper.tolaria.recovery.copy_engine import CopyEngine, StreamCopier, host_buffer_like
from esper.tolaria.recovery.snapshot_copier import BackgroundCopier, CopyJob
from esper.tolaria.state.snapshot import SnapshotCopyError

ENGINES = ["thread", pytest.param("stream", marks=pytest.mark.gpu)]
BIG = 1 << 24  # 64 MiB of float32: long enough to watch a copy run


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> Iterator[tuple[CopyEngine, torch.device]]:
    if request.param == "thread":
        copier = BackgroundCopier()
        yield copier, torch.device("cpu")
        copier.close()
    else:
        yield StreamCopier(), torch.device("cuda", torch.cuda.current_device())


def _source(device: torch.device, value: float, n: int = 4096) -> torch.Tensor:
    return torch.full((n,), value, device=device)


def _ordered_host_view(device: torch.device) -> None:
    """What the training thread does before reading host memory its own stream wrote: on CUDA,
    wait for the current stream (which `wait()` ordered after the copy); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def test_copies_are_complete_in_the_threads_order_once_wait_returns(engine: tuple[CopyEngine, Any]) -> None:
    copier, device = engine
    src = [_source(device, 3.0, BIG), _source(device, -1.5)]
    dst = [host_buffer_like(t) for t in src]
    job = copier.submit(dst, src)
    job.wait()
    _ordered_host_view(device)
    assert all(bool((d == s.cpu()).all()) for d, s in zip(dst, src, strict=True))
    assert job.done()


def test_a_write_to_the_source_after_wait_never_reaches_the_copy(engine: tuple[CopyEngine, Any]) -> None:
    copier, device = engine
    src = _source(device, 1.0, BIG)
    dst = host_buffer_like(src)
    job = copier.submit([dst], [src])
    job.wait()
    src.add_(1.0)  # the optimizer step, right after the settle
    job.synchronize()
    assert bool((dst == 1.0).all())


def test_pairs_copied_at_once_are_taken_before_the_threads_next_work(engine: tuple[CopyEngine, Any]) -> None:
    copier, device = engine
    buffers, params = _source(device, 5.0), _source(device, 7.0, BIG)
    dst = [host_buffer_like(buffers), host_buffer_like(params)]
    job = copier.submit(dst, [buffers, params], at_once=1)
    buffers.mul_(0.0)  # the next forward pass moves BatchNorm's statistics, no wait in between
    job.wait()
    job.synchronize()
    assert bool((dst[0] == 5.0).all()) and bool((dst[1] == 7.0).all())


def test_a_failed_copy_surfaces_at_wait_and_at_synchronize(engine: tuple[CopyEngine, Any]) -> None:
    copier, device = engine
    job = copier.submit([torch.zeros(2)], [_source(device, 1.0, 3)])  # shapes that cannot copy
    with pytest.raises(SnapshotCopyError, match="failed"):
        job.wait()
    with pytest.raises(SnapshotCopyError, match="failed"):
        job.synchronize()


def test_jobs_run_in_submission_order(engine: tuple[CopyEngine, Any]) -> None:
    copier, device = engine
    first, second = _source(device, 1.0, BIG), _source(device, 2.0, BIG)
    dst = host_buffer_like(first)
    jobs = [copier.submit([dst], [first]), copier.submit([dst], [second])]
    for job in jobs:
        job.synchronize()
    assert bool((dst == 2.0).all())
    assert copier.jobs_total == 2 and copier.bytes_total == 2 * BIG * 4


def test_a_job_keeps_its_source_alive_until_it_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    """A source freed under a running copy (a culled seed's parameter) keeps its memory until the
    copy is done, then is released: nothing reuses memory the copy still reads."""
    gate = threading.Event()
    real_run = CopyJob.run
    monkeypatch.setattr(CopyJob, "run", lambda job: (gate.wait(10), real_run(job)))
    copier = BackgroundCopier()
    src = torch.ones(1024)
    alive = weakref.ref(src)
    job = copier.submit([torch.zeros(1024)], [src])
    del src
    gc.collect()
    assert alive() is not None and not job.done()
    gate.set()
    job.wait()
    gc.collect()
    assert alive() is None and job.done()
    copier.close()


@pytest.mark.gpu
def test_a_cuda_copy_runs_beside_the_stream_and_the_host_does_not_wait() -> None:
    """Copy-behind overlaps: right after submit the event of a large copy is not complete (the
    host went on), and `wait()` orders the stream after it without blocking the host."""
    copier = StreamCopier()
    src = torch.randn(1 << 27, device="cuda")  # 512 MiB: tens of milliseconds over PCIe
    dst = host_buffer_like(src)
    assert dst.is_pinned()
    job = copier.submit([dst], [src])
    assert not job.done()
    job.wait()  # the stream waits, not the host
    torch.cuda.current_stream().synchronize()
    assert job.done()
    assert torch.equal(dst, src.cpu())


@pytest.mark.gpu
def test_a_cuda_job_keeps_its_source_alive_until_its_event_completes() -> None:
    copier = StreamCopier()
    src = torch.randn(1 << 26, device="cuda")
    alive = weakref.ref(src)
    job = copier.submit([host_buffer_like(src)], [src])
    del src
    gc.collect()
    assert alive() is not None
    job.synchronize()
    gc.collect()
    assert alive() is None
