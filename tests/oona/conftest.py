"""Fixtures for the Oona tests: a secret, unique stream names, and a RedisBus on the session Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from oona_support import SECRET, unique_streams

from esper.oona import RedisBus, StreamNames


@pytest.fixture()
def streams() -> StreamNames:
    return unique_streams()


@pytest.fixture()
def bus(redis_url: str, streams: StreamNames) -> Iterator[RedisBus]:
    bus = RedisBus(redis_url, streams=streams, secret=SECRET)
    try:
        yield bus
    finally:
        bus.close()
