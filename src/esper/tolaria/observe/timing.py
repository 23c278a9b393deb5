"""Timing of named phases, with budgets and percentile summaries, true on a CPU and on a GPU.

Contract:

- On a CPU run a phase is timed with `time.perf_counter_ns` and known as soon as it ends.
- On a CUDA run (`device` of type cuda) a phase is the time between two CUDA events recorded on
  the current stream at its start and end, so it measures when the device did the work queued in
  it, not when the host queued it. Recording an event does not synchronise; the elapsed time is
  read lazily: completed intervals are resolved without waiting (`EventIntervals.resolve`), and
  reading the results (`last`, `samples`, `summary`) waits for the rest. Those reads happen at a
  boundary or at the end of a run, never inside a step.
- `event_factory(device)` chooses the clock, once: CUDA timing events for a CUDA device, None
  (the wall clock) otherwise. Tests pass a stand-in factory with the same four methods.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

# The boundary's own phases, each with a budget (validation is timed outside the budget).
OWN_PHASES = ("state_assembly", "tamiyo", "apply", "check")

K = TypeVar("K")


class TimingEvent(Protocol):
    """What a device timing event offers (`torch.cuda.Event(enable_timing=True)` has these)."""

    def record(self) -> None: ...

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...

    def elapsed_time(self, end_event: Any) -> float: ...


EventFactory = Callable[[], TimingEvent]


def event_factory(device: Any) -> EventFactory | None:
    """CUDA timing events for a CUDA `device` (a `torch.device` or its string), None for any other:
    those are timed with the wall clock."""
    if device is None:
        return None
    import torch

    if torch.device(device).type != "cuda":
        return None
    return lambda: torch.cuda.Event(enable_timing=True)  # type: ignore[return-value]


class EventIntervals(Generic[K]):
    """Intervals between pairs of device events, each under a key, resolved into milliseconds later.

    `begin()` records a start event; `end(start, key)` records the end event and queues the pair.
    Events on one stream complete in the order they were recorded, so `resolve(wait=False)` pops
    queued intervals from the oldest while their end event has completed and stops at the first that
    has not; `resolve(wait=True)` waits for each (a device synchronisation: boundaries and ends only).
    """

    def __init__(self, new_event: EventFactory) -> None:
        self._new_event = new_event
        self._pending: deque[tuple[K, TimingEvent, TimingEvent]] = deque()

    def begin(self) -> TimingEvent:
        start = self._new_event()
        start.record()
        return start

    def end(self, start: TimingEvent, key: K) -> None:
        stop = self._new_event()
        stop.record()
        self._pending.append((key, start, stop))

    def __len__(self) -> int:
        return len(self._pending)

    def resolve(self, *, wait: bool) -> list[tuple[K, float]]:
        """The (key, ms) of the intervals resolved now, oldest first."""
        out: list[tuple[K, float]] = []
        pending = self._pending
        while pending:
            key, start, stop = pending[0]
            if wait:
                stop.synchronize()
            elif not stop.query():
                break
            pending.popleft()
            out.append((key, float(start.elapsed_time(stop))))
        return out


class MonotonicTimer:
    """Times phases (see the module docstring for the clock); keeps the last `window` samples per phase."""

    def __init__(self, budgets_ms: Mapping[str, float], *, window: int = 10_000,
                 events: EventFactory | None = None) -> None:
        self.budgets_ms = dict(budgets_ms)
        self._samples: dict[str, deque[float]] = {}
        self._window = window
        self._last: dict[str, float] = {}
        self._intervals: EventIntervals[str] | None = EventIntervals(events) if events is not None else None

    @property
    def on_device(self) -> bool:
        """True when phases are timed with device events (a CUDA run)."""
        return self._intervals is not None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        intervals = self._intervals
        if intervals is not None:
            start_event = intervals.begin()
            try:
                yield
            finally:
                intervals.end(start_event, name)
            return
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            self.record(name, (time.perf_counter_ns() - start) / 1e6)

    def record(self, name: str, ms: float) -> None:
        """A sample measured by the caller (a wall-clock span it timed itself)."""
        self._last[name] = ms
        self._samples.setdefault(name, deque(maxlen=self._window)).append(ms)

    def settle(self, *, wait: bool = True) -> None:
        """Fold the device intervals resolved now into the samples; with `wait`, wait for all of them."""
        if self._intervals is not None:
            for name, ms in self._intervals.resolve(wait=wait):
                self.record(name, ms)

    @property
    def last(self) -> dict[str, float]:
        """The latest sample of each phase, in ms (on a CUDA run, waits for the phases still queued)."""
        self.settle()
        return self._last

    def samples(self, name: str) -> list[float]:
        """The kept samples of `name` in ms, oldest first."""
        self.settle()
        return list(self._samples.get(name, ()))

    def summary(self) -> dict[str, dict[str, float]]:
        self.settle()
        out: dict[str, dict[str, float]] = {}
        for name, values in self._samples.items():
            arr = np.fromiter(values, dtype=np.float64)
            out[name] = {
                "p50": float(np.percentile(arr, 50)),
                "p99": float(np.percentile(arr, 99)),
                "max": float(arr.max()),
                "count": int(arr.size),
            }
            if name in self.budgets_ms:
                out[name]["budget"] = self.budgets_ms[name]
        return out
