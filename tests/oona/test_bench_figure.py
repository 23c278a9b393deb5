"""The Oona bench figure runs against a real Redis and reports positive rates."""

from __future__ import annotations

import pytest

from esper.tolaria.bench.figures_oona import redis_events_per_s
from esper.tolaria.bench.registry import FIGURES

pytestmark = pytest.mark.redis


def test_redis_events_per_s_is_registered_as_a_redis_figure() -> None:
    spec = FIGURES["redis_events_per_s"]
    assert spec.needs == "redis" and spec.better == "higher" and spec.goal == 10_000


def test_redis_events_per_s_measures_and_cleans_up(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    import redis

    monkeypatch.setenv("TOLARIA_BENCH_OONA", redis_url)
    client = redis.Redis.from_url(redis_url)
    before = set(client.scan_iter("bench.*"))
    values = redis_events_per_s(True)
    assert len(values) == 3 and all(v > 0 for v in values)
    assert set(client.scan_iter("bench.*")) == before


def test_redis_events_per_s_without_url_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOLARIA_BENCH_OONA", raising=False)
    with pytest.raises(RuntimeError, match="TOLARIA_BENCH_OONA"):
        redis_events_per_s(True)
