"""Timing on a device: the clock is chosen by the run's device, device intervals are read lazily
(nothing synchronises inside a phase or a span), and reads wait for what is still queued.

A stand-in event class plays the CUDA event: `record()` queues it on a fake stream, the test
decides when the stream has run it, and `elapsed_time` refuses events that have not completed,
as `cudaEventElapsedTime` does."""

from __future__ import annotations

import threading

import pytest
import torch

from esper.tolaria.observe.profiling import RESOLVE_EVERY, Profiler
from esper.tolaria.observe.timing import EventIntervals, MonotonicTimer, event_factory


class FakeStream:
    """Events run in the order recorded; each takes `step_ms` of device time after the previous."""

    def __init__(self, step_ms: float = 2.0) -> None:
        self.step_ms = step_ms
        self.queued: list[FakeEvent] = []
        self.clock_ms = 0.0
        self.syncs = 0
        self.queries = 0

    def event(self) -> FakeEvent:
        return FakeEvent(self)

    def run(self, n: int | None = None) -> None:
        """The device executes the first `n` queued events (all by default)."""
        count = len(self.queued) if n is None else n
        for event in self.queued[:count]:
            self.clock_ms += self.step_ms
            event.at_ms, event.done = self.clock_ms, True
        del self.queued[:count]


class FakeEvent:
    def __init__(self, stream: FakeStream) -> None:
        self.stream, self.done, self.at_ms = stream, False, 0.0

    def record(self) -> None:
        self.stream.queued.append(self)

    def query(self) -> bool:
        self.stream.queries += 1
        return self.done

    def synchronize(self) -> None:
        self.stream.syncs += 1
        while not self.done:
            self.stream.run(1)

    def elapsed_time(self, end_event: FakeEvent) -> float:
        if not (self.done and end_event.done):
            raise RuntimeError("cudaErrorNotReady: an event has not completed")
        return end_event.at_ms - self.at_ms


def test_the_clock_is_cuda_events_for_a_cuda_device_and_the_wall_clock_otherwise() -> None:
    assert event_factory(None) is None
    assert event_factory("cpu") is None
    assert event_factory(torch.device("cpu")) is None
    assert callable(event_factory(torch.device("cuda")))  # chosen without touching CUDA
    assert callable(event_factory("cuda:1"))


def test_a_device_phase_synchronises_nothing_and_is_read_when_its_result_is_asked_for() -> None:
    stream = FakeStream(step_ms=3.0)
    timer = MonotonicTimer({"tamiyo": 12.0}, events=stream.event)
    assert timer.on_device
    with timer.phase("tamiyo"):
        pass
    with timer.phase("apply"):
        pass
    assert stream.syncs == 0 and stream.queries == 0  # the phases only recorded events
    assert len(stream.queued) == 4
    last = timer.last  # a read: waits for the device
    assert last == {"tamiyo": pytest.approx(3.0), "apply": pytest.approx(3.0)}
    assert stream.syncs == 2 and stream.queued == []
    assert timer.summary()["tamiyo"] == {"p50": 3.0, "p99": 3.0, "max": 3.0, "count": 1, "budget": 12.0}


def test_device_intervals_resolve_oldest_first_and_stop_at_the_first_unfinished_without_waiting() -> None:
    stream = FakeStream(step_ms=1.0)
    intervals: EventIntervals[str] = EventIntervals(stream.event)
    for name in ("a", "b", "c"):
        intervals.end(intervals.begin(), name)
    stream.run(3)  # a's two events and b's start: b has not finished
    assert intervals.resolve(wait=False) == [("a", 1.0)]
    assert stream.syncs == 0 and len(intervals) == 2
    assert intervals.resolve(wait=True) == [("b", 1.0), ("c", 1.0)]
    assert len(intervals) == 0


def test_a_cpu_timer_times_with_the_wall_clock_at_once() -> None:
    timer = MonotonicTimer({}, events=event_factory("cpu"))
    assert not timer.on_device
    with timer.phase("validate"):
        pass
    assert timer._last["validate"] >= 0.0  # known at once, no settle needed


def test_device_spans_record_on_exit_fold_finished_ones_without_waiting_and_reads_wait() -> None:
    stream = FakeStream(step_ms=0.5)
    prof = Profiler(True, events=stream.event)
    assert prof.on_device
    for _ in range(RESOLVE_EVERY - 1):
        with prof.span("step.forward"):
            pass
        stream.run()  # the device keeps up: both events of the span have run
    assert prof._phases == {} and stream.syncs == 0  # queued, not yet read
    with prof.span("step.backward", batch=3):
        pass  # the RESOLVE_EVERY-th: a fold without waiting; this span's end event has not run
    assert stream.syncs == 0
    assert prof._phases["step.forward"].count == RESOLVE_EVERY - 1
    assert "step.backward" not in prof._phases
    stats = prof.phase_stats()  # a read: waits for the rest
    assert stream.syncs == 1
    assert stats["step.backward"]["count"] == 1
    assert stats["step.forward"]["p50_ms"] == pytest.approx(0.5)  # the device's time, not the host's
    name, _, dur_ns, tid, attrs = prof.events[-1]
    assert (name, dur_ns, tid, attrs) == ("step.backward", 500_000, threading.get_native_id(), {"batch": 3})


def test_spans_on_other_threads_keep_the_wall_clock_on_a_device_run() -> None:
    stream = FakeStream()
    prof = Profiler(True, events=stream.event)

    def publisher() -> None:
        with prof.span("step.telemetry"):
            pass

    worker = threading.Thread(target=publisher)
    worker.start()
    worker.join()
    assert stream.queued == []  # no device event for the host thread's span
    assert prof._phases["step.telemetry"].count == 1


def test_a_disabled_profiler_on_a_device_run_is_still_the_shared_noop() -> None:
    stream = FakeStream()
    prof = Profiler(False, events=stream.event)
    with prof.span("step.forward"):
        pass
    assert not prof.on_device and stream.queued == [] and prof.phase_stats() == {}
