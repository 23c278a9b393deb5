"""Monotonic timing of named phases, with budgets and percentile summaries."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np

# The boundary's own phases, each with a budget (validation is timed outside the budget).
OWN_PHASES = ("state_assembly", "tamiyo", "apply", "check")

class MonotonicTimer:
    """Times phases with `time.perf_counter_ns`; keeps the last `window` samples per phase."""

    def __init__(self, budgets_ms: Mapping[str, float], *, window: int = 10_000) -> None:
        self.budgets_ms = dict(budgets_ms)
        self._samples: dict[str, deque[float]] = {}
        self._window = window
        self.last: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            self.record(name, (time.perf_counter_ns() - start) / 1e6)

    def record(self, name: str, ms: float) -> None:
        self.last[name] = ms
        self._samples.setdefault(name, deque(maxlen=self._window)).append(ms)

    def samples(self, name: str) -> list[float]:
        """The kept samples of `name` in ms, oldest first."""
        return list(self._samples.get(name, ()))

    def summary(self) -> dict[str, dict[str, float]]:
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
