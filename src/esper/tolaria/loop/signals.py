"""SIGTERM and SIGINT during `fit()`: finish the current step, checkpoint, and leave the loop."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from esper.tolaria.state.position import StopRequest


@contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[None]:
    """Turn SIGTERM/SIGINT into `stop.request(name)` while the block runs; outside the main thread
    the embedding application owns signals and nothing is installed."""

    def request_stop(signum: int, _frame: Any) -> None:
        stop.request(signal.Signals(signum).name)

    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, request_stop)
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
