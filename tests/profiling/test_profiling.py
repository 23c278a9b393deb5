"""Profiler: free when off, honest spans and a loadable Chrome trace when on."""

from __future__ import annotations

import json
import threading
import tracemalloc
from pathlib import Path

import pytest
import torch

from esper.tolaria.observe import profiling as profiling_module
from esper.tolaria.observe.profiling import NOOP_SPAN, Profiler


def test_disabled_span_is_the_shared_noop_and_records_nothing(tmp_path: Path) -> None:
    prof = Profiler(False, trace_path=tmp_path / "trace.json")
    first = prof.span("step.forward")
    second = prof.span("boundary.apply", epoch=3)
    assert first is NOOP_SPAN and second is NOOP_SPAN
    with prof.span("step.forward"):
        pass
    assert prof.phase_stats() == {}
    assert prof.events == []
    assert prof.close() is None
    assert not (tmp_path / "trace.json").exists()


def test_disabled_spans_retain_no_memory() -> None:
    prof = Profiler(False)
    for _ in range(100):  # warm caches and free lists
        with prof.span("step.forward"):
            pass
    # Only what profiling.py allocated counts: threads left by other tests may allocate meanwhile.
    only_profiling = [tracemalloc.Filter(True, profiling_module.__file__)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces(only_profiling)
        for _ in range(20_000):
            with prof.span("step.forward"):
                pass
        after = tracemalloc.take_snapshot().filter_traces(only_profiling)
    finally:
        tracemalloc.stop()
    grown = [d for d in after.compare_to(before, "filename") if d.size_diff > 0]
    assert grown == []


def test_enabled_spans_nest_and_record_thread_and_attrs() -> None:
    prof = Profiler(True)
    with prof.span("boundary.apply", epoch=4, command="germinate"):
        with prof.span("boundary.check"):
            pass
    events = {name: (start, dur, tid, attrs) for name, start, dur, tid, attrs in prof.events}
    outer, inner = events["boundary.apply"], events["boundary.check"]
    assert outer[0] <= inner[0] and inner[0] + inner[1] <= outer[0] + outer[1]
    assert outer[2] == inner[2] == threading.get_native_id()
    assert outer[3] == {"epoch": 4, "command": "germinate"}
    assert inner[3] is None


def test_span_is_recorded_when_the_body_raises_and_the_error_propagates() -> None:
    prof = Profiler(True)
    with pytest.raises(ValueError, match="boom"):
        with prof.span("step.backward"):
            raise ValueError("boom")
    assert prof.phase_stats()["step.backward"]["count"] == 1


def test_spans_from_other_threads_carry_their_own_thread_id() -> None:
    prof = Profiler(True)
    seen: list[int] = []

    def work() -> None:
        seen.append(threading.get_native_id())
        with prof.span("step.telemetry"):
            pass

    worker = threading.Thread(target=work, name="telemetry-publisher")
    worker.start()
    worker.join()
    with prof.span("step.forward"):
        pass
    tids = {name: tid for name, _, _, tid, _ in prof.events}
    assert tids["step.telemetry"] == seen[0] != tids["step.forward"]
    names = {e["tid"]: e["args"]["name"] for e in prof.chrome_trace()["traceEvents"] if e["name"] == "thread_name"}
    assert names[seen[0]] == "telemetry-publisher"


def test_event_cap_bounds_memory_and_counts_drops_while_stats_stay_exact() -> None:
    prof = Profiler(True, max_events=5)
    for _ in range(8):
        with prof.span("step.forward"):
            pass
    assert len(prof.events) == 5
    assert prof.dropped_events == 3
    assert prof.phase_stats()["step.forward"]["count"] == 8
    assert prof.chrome_trace()["otherData"]["dropped_events"] == 3


def test_phase_stats_percentiles_and_totals_from_known_durations() -> None:
    prof = Profiler(True)
    for ms in range(1, 101):  # 1 ms .. 100 ms, fed straight to the recorder
        prof._record("boundary.tamiyo", 0, ms * 1_000_000, 1, None)
    stats = prof.phase_stats()["boundary.tamiyo"]
    assert stats["count"] == 100
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["max_ms"] == pytest.approx(100.0)
    assert stats["total_ms"] == pytest.approx(5050.0)


def test_chrome_trace_file_is_valid_trace_event_json(tmp_path: Path) -> None:
    prof = Profiler(True)
    with prof.span("step.forward", batch=7, device=torch.device("cpu"), loss=float("nan")):
        pass
    path = prof.write_chrome_trace(tmp_path / "sub" / "trace.json")
    data = json.loads(path.read_text())
    assert data["displayTimeUnit"] == "ms"
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == 1
    span = spans[0]
    assert set(span) >= {"name", "ph", "ts", "dur", "pid", "tid", "args"}
    assert span["name"] == "step.forward"
    assert span["ts"] >= 0 and span["dur"] >= 0
    _, _, dur_ns, _, _ = prof.events[0]
    assert span["dur"] == pytest.approx(dur_ns / 1e3)
    assert span["args"] == {"batch": 7, "device": "cpu", "loss": "nan"}


def test_close_writes_the_trace_to_trace_path_once(tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    prof = Profiler(True, trace_path=path)
    with prof.span("boundary.snapshot"):
        pass
    assert prof.close() == path
    first = path.read_text()
    with prof.span("boundary.snapshot"):
        pass
    assert prof.close() is None
    assert path.read_text() == first


def test_spans_appear_in_an_active_torch_profiler() -> None:
    prof = Profiler(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tprof:
        with prof.span("step.forward"):
            torch.ones(4) + 1
    names = {evt.key for evt in tprof.key_averages()}
    assert "step.forward" in names
    assert prof.phase_stats()["step.forward"]["count"] == 1


def test_invalid_limits_are_rejected_with_the_field_name() -> None:
    with pytest.raises(ValueError, match="max_events"):
        Profiler(True, max_events=-1)
    with pytest.raises(ValueError, match="stats_window"):
        Profiler(True, stats_window=0)
