"""Shared fixtures. `redis_url` gives a real redis-server: the one `make test` started
(REDIS_URL) or, failing that, one started here for the session. Tests marked `gpu` are collected
everywhere and skipped where torch sees no CUDA device."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from redis_server import RedisServer  # noqa: E402

NEEDS_CUDA = "needs CUDA"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    import torch  # only once a gpu test is collected: the CPU suite's collection stays as it was

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason=NEEDS_CUDA)
        for item in gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture()
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which the test may kill and restart."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()
