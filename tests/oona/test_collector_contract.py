"""Tolaria's telemetry collector over both Oona buses: the contract the trainer relies on."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from oona_support import SECRET

from esper.leyline import EMERGENCY_LEVEL_HALT, EmergencySignal
from esper.oona import InProcessBus, RedisBus
from esper.tolaria.observe.telemetry import TelemetryCollector


def test_collector_events_reach_the_jsonl_sink(tmp_path: Path) -> None:
    bus = InProcessBus(tmp_path / "telemetry.jsonl")
    collector = TelemetryCollector(bus)
    collector.emit_event("conservative_mode_entered", reason="test")
    collector.close()
    bus.close()
    (record,) = [json.loads(line) for line in (tmp_path / "telemetry.jsonl").read_text().splitlines()]
    assert record["stream"] == "oona.telemetry"
    assert record["payload"]["events"][0]["description"] == "conservative_mode_entered"


@pytest.mark.redis
def test_collector_keeps_going_while_redis_is_down(private_redis) -> None:
    bus = RedisBus(private_redis.url, secret=SECRET)
    collector = TelemetryCollector(bus)
    private_redis.stop()
    start = time.perf_counter()
    collector.publish_emergency(EmergencySignal(version=1, level=EMERGENCY_LEVEL_HALT, reason="drill"))
    elapsed = time.perf_counter() - start
    collector.close()
    bus.close()
    assert collector.publish_failures == 1 and "BusUnavailable" in collector.last_error
    assert elapsed < 0.5  # an emergency publish on the caller's thread must not hang on a dead Redis
