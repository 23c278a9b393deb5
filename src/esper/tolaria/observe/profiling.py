"""Spans around the phases of a step and of an epoch boundary, with Chrome trace export.

Contract:

- `Profiler(enabled=False)` costs almost nothing: `span()` returns one shared no-op context
  manager; no event, timestamp or dict of ours is created (bench figure `profiler_off_overhead_ns`).
- `Profiler(enabled=True)` records each span's begin and duration with `time.perf_counter_ns` on
  the calling thread (its id is kept), aggregates per-name durations for `phase_stats()`, and keeps
  at most `max_events` events for the trace; events past the cap are counted in `dropped_events`.
  Spans nest naturally: Chrome's viewer stacks "X" events on one thread by their times.
- On a CUDA run (`events=observe.timing.event_factory(device)`), a span opened on the thread that
  built the profiler (the training thread) is timed by two CUDA events on the current stream: its
  duration is the device's, its start the host's clock when it was opened. Nothing synchronises
  in a span: finished spans are folded in every `RESOLVE_EVERY` spans without waiting, and every
  read (`events`, `phase_stats()`, the trace, `close()`) waits for the rest, at a boundary or
  at the end. Spans on other threads (the telemetry publisher, the checkpoint writer) keep the
  wall clock: their work is the host's.
- When a torch profiler is active, each span is also a `torch.profiler.record_function(name)`,
  so Tolaria's phases appear in torch's own traces.
- `write_chrome_trace(path)` writes Chrome Trace Event JSON (Perfetto, chrome://tracing);
  `close()` writes it to `trace_path` when one was given.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from esper.tolaria.checkpoint.atomic import atomic_write_bytes
from esper.tolaria.observe.timing import EventFactory, EventIntervals, TimingEvent

DEFAULT_MAX_EVENTS = 200_000
DEFAULT_STATS_WINDOW = 10_000
RESOLVE_EVERY = 256  # device spans queued between non-blocking folds: bounds the queue, costs one query each

# (name, start_ns, duration_ns, thread_id, attrs or None)
Event = tuple[str, int, int, int, dict[str, Any] | None]


class _NoopSpan:
    """The span handed out while profiling is off: one shared instance, no state."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None


NOOP_SPAN = _NoopSpan()


def _torch_profiler_off() -> bool:
    return False


def _torch_profiler_probe() -> Callable[[], bool]:
    """The cheapest "is a torch profiler recording?" check this torch offers (a C call), found once."""
    try:
        from torch._C._autograd import _profiler_enabled
    except ImportError:  # no torch, or a torch without the probe: spans stay Tolaria-only
        return _torch_profiler_off
    return _profiler_enabled  # type: ignore[no-any-return]


_torch_profiler_active = _torch_profiler_probe()


class _Span:
    """One timed region; records itself into its profiler on exit, even when the body raised."""

    __slots__ = ("_profiler", "_name", "_attrs", "_start", "_torch_ctx")

    def __init__(self, profiler: Profiler, name: str, attrs: dict[str, Any] | None) -> None:
        self._profiler = profiler
        self._name = name
        self._attrs = attrs
        self._start = 0
        self._torch_ctx: Any = None

    def __enter__(self) -> None:
        self._enter_torch()
        self._start = time.perf_counter_ns()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        end = time.perf_counter_ns()
        self._exit_torch(exc_type, exc, tb)
        self._profiler._record(self._name, self._start, end - self._start, threading.get_native_id(), self._attrs)

    def _enter_torch(self) -> None:
        if _torch_profiler_active():
            from torch.profiler import record_function

            self._torch_ctx = record_function(self._name)
            self._torch_ctx.__enter__()

    def _exit_torch(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                    tb: TracebackType | None) -> None:
        if self._torch_ctx is not None:
            self._torch_ctx.__exit__(exc_type, exc, tb)
            self._torch_ctx = None


class _DeviceSpan(_Span):
    """A span timed by device events: queued on exit, its duration resolved later by the profiler."""

    __slots__ = ("_event",)

    def __enter__(self) -> None:
        self._enter_torch()
        self._start = time.perf_counter_ns()
        self._event = self._profiler._intervals_begin()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._profiler._intervals_end(self._event, (self._name, self._start, threading.get_native_id(), self._attrs))
        self._exit_torch(exc_type, exc, tb)


class _PhaseAccumulator:
    """Exact count/total/max for a span name, percentiles over the last `window` samples."""

    __slots__ = ("count", "total_ns", "max_ns", "recent")

    def __init__(self, window: int) -> None:
        self.count = 0
        self.total_ns = 0
        self.max_ns = 0
        self.recent: deque[int] = deque(maxlen=window)

    def add(self, duration_ns: int) -> None:
        self.count += 1
        self.total_ns += duration_ns
        self.max_ns = max(self.max_ns, duration_ns)
        self.recent.append(duration_ns)

    def stats(self) -> dict[str, float]:
        arr = np.fromiter(self.recent, dtype=np.float64) / 1e6
        return {
            "count": self.count,
            "p50_ms": float(np.percentile(arr, 50)),
            "p99_ms": float(np.percentile(arr, 99)),
            "max_ms": self.max_ns / 1e6,
            "total_ms": self.total_ns / 1e6,
        }


class Profiler:
    """Named spans for the trainer's phases; see the module docstring for the contract."""

    def __init__(self, enabled: bool, *, trace_path: Path | None = None,
                 max_events: int = DEFAULT_MAX_EVENTS, stats_window: int = DEFAULT_STATS_WINDOW,
                 events: EventFactory | None = None) -> None:
        if max_events < 0:
            raise ValueError(f"Profiler max_events must be >= 0, got {max_events}")
        if stats_window < 1:
            raise ValueError(f"Profiler stats_window must be >= 1, got {stats_window}")
        self.enabled = bool(enabled)
        self.trace_path = Path(trace_path) if trace_path is not None else None
        self.max_events = max_events
        self.dropped_events = 0
        self._stats_window = stats_window
        self._events: list[Event] = []
        self._phases: dict[str, _PhaseAccumulator] = {}
        self._thread_names: dict[int, str] = {}
        self._lock = threading.Lock()
        self._origin_ns = time.perf_counter_ns()
        self._closed = False
        # device spans: (name, start_ns, tid, attrs) keyed intervals, on the thread that built the profiler
        self._intervals: EventIntervals[tuple[str, int, int, dict[str, Any] | None]] | None = (
            EventIntervals(events) if events is not None and self.enabled else None)
        self._device_thread = threading.get_ident()
        self._since_resolve = 0
        self._resolve_lock = threading.Lock()  # a read on another thread may resolve while the trainer does

    @property
    def on_device(self) -> bool:
        """True when the training thread's spans are timed with device events (a CUDA run)."""
        return self._intervals is not None

    def span(self, name: str, /, **attrs: Any) -> _Span | _NoopSpan:
        """A context manager timing the block as `name`; `attrs` go to the trace event's args.

        While disabled this returns the shared `NOOP_SPAN` and does nothing else.
        """
        if not self.enabled:
            return NOOP_SPAN
        if self._intervals is not None and threading.get_ident() == self._device_thread:
            return _DeviceSpan(self, name, attrs or None)
        return _Span(self, name, attrs or None)

    def _intervals_begin(self) -> TimingEvent:
        assert self._intervals is not None  # only device spans call this
        return self._intervals.begin()

    def _intervals_end(self, start: TimingEvent, key: tuple[str, int, int, dict[str, Any] | None]) -> None:
        assert self._intervals is not None
        self._intervals.end(start, key)
        self._since_resolve += 1
        if self._since_resolve >= RESOLVE_EVERY:
            self._resolve(wait=False)

    def _resolve(self, *, wait: bool) -> None:
        """Record the device spans that finished (all of them with `wait`: a device synchronisation)."""
        if self._intervals is None:
            return
        with self._resolve_lock:
            self._since_resolve = 0
            for (name, start_ns, tid, attrs), ms in self._intervals.resolve(wait=wait):
                self._record(name, start_ns, int(ms * 1e6), tid, attrs)

    def _record(self, name: str, start_ns: int, duration_ns: int, tid: int, attrs: dict[str, Any] | None) -> None:
        with self._lock:
            acc = self._phases.get(name)
            if acc is None:
                acc = self._phases[name] = _PhaseAccumulator(self._stats_window)
            acc.add(duration_ns)
            if tid not in self._thread_names:
                self._thread_names[tid] = threading.current_thread().name
            if len(self._events) < self.max_events:
                self._events.append((name, start_ns, duration_ns, tid, attrs))
            else:
                self.dropped_events += 1

    @property
    def events(self) -> list[Event]:
        """A copy of the retained events, oldest first."""
        self._resolve(wait=True)
        with self._lock:
            return list(self._events)

    def phase_stats(self) -> dict[str, dict[str, float]]:
        """Per span name: `count`, `total_ms`, `max_ms` over every span; `p50_ms`/`p99_ms` over the
        last `stats_window` spans of that name."""
        self._resolve(wait=True)
        with self._lock:
            return {name: acc.stats() for name, acc in sorted(self._phases.items())}

    def chrome_trace(self) -> dict[str, Any]:
        """The trace as a Chrome Trace Event Format object (times in microseconds)."""
        pid = os.getpid()
        self._resolve(wait=True)
        with self._lock:
            events = list(self._events)
            threads = dict(self._thread_names)
            dropped = self.dropped_events
        trace: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": "tolaria"}},
        ]
        trace.extend({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": tname}}
                     for tid, tname in threads.items())
        trace.extend(
            {"name": name, "cat": name.split(".", 1)[0], "ph": "X",
             "ts": (start - self._origin_ns) / 1e3, "dur": dur / 1e3,
             "pid": pid, "tid": tid, "args": _json_args(attrs)}
            for name, start, dur, tid, attrs in events
        )
        return {"traceEvents": trace, "displayTimeUnit": "ms",
                "otherData": {"dropped_events": dropped, "max_events": self.max_events}}

    def write_chrome_trace(self, path: Path) -> Path:
        """Write the trace atomically to `path` (parents created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(self.chrome_trace(), allow_nan=False).encode())
        return path

    def close(self) -> Path | None:
        """Write the trace to `trace_path` once, if enabled and a path was given; returns it."""
        already, self._closed = self._closed, True
        if already or not self.enabled or self.trace_path is None:
            return None
        return self.write_chrome_trace(self.trace_path)


def _json_args(attrs: dict[str, Any] | None) -> dict[str, Any]:
    """Span attributes as JSON values; anything not a JSON scalar is written as its str()."""
    if not attrs:
        return {}
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, float) and not np.isfinite(value):
            out[key] = str(value)
        elif value is None or isinstance(value, (str, int, float, bool)):
            out[key] = value
        else:
            out[key] = str(value)
    return out
