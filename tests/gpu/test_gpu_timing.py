"""Timing on CUDA: spans and boundary phases timed by CUDA events never synchronise while they
are recorded (sync debug "error" raises at any synchronising call), and their durations are the
device's: a span around queued matmuls reads their GPU time, not the microseconds of queuing them."""

from __future__ import annotations

import time

import pytest
import torch

from esper.tolaria.observe.profiling import RESOLVE_EVERY, Profiler
from esper.tolaria.observe.timing import MonotonicTimer, event_factory

pytestmark = pytest.mark.gpu


def _queue_matmuls(a: torch.Tensor, n: int = 2) -> None:
    for _ in range(n):
        a = a @ a
        a = a / a.norm()


def test_device_spans_and_phases_record_without_synchronising_and_read_the_gpu_time() -> None:
    events = event_factory(torch.device("cuda"))
    assert events is not None
    prof, timer = Profiler(True, events=events), MonotonicTimer({}, events=events)
    a = torch.randn(4096, 4096, device="cuda")
    _queue_matmuls(a)  # kernels chosen
    torch.cuda.synchronize()
    started = time.perf_counter()
    _queue_matmuls(a)
    torch.cuda.synchronize()
    work_ms = (time.perf_counter() - started) * 1e3  # one span's work, waited for
    host_s = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(RESOLVE_EVERY + 4):  # past a non-blocking fold
            started = time.perf_counter()
            with prof.span("step.forward"), timer.phase("validate"):
                _queue_matmuls(a)
            host_s.append(time.perf_counter() - started)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stats = prof.phase_stats()["step.forward"]
    assert stats["count"] == RESOLVE_EVERY + 4
    gpu_ms = stats["p50_ms"]
    assert gpu_ms == pytest.approx(work_ms, rel=0.5)  # the device's time ...
    assert gpu_ms > 5 * 1e3 * min(host_s)  # ... not the host's time to queue it
    assert timer.summary()["validate"]["p50"] == pytest.approx(gpu_ms, rel=0.2)
