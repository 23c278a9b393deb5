"""The step never waits on telemetry; a full queue drops lowest priority first and counts it."""

from __future__ import annotations

import threading
import time

from esper.leyline import (
    MESSAGE_PRIORITY_CRITICAL,
    MESSAGE_PRIORITY_HIGH,
    MESSAGE_PRIORITY_LOW,
    MESSAGE_PRIORITY_NORMAL,
    BusEnvelope,
    TelemetryPacket,
)
from esper.tolaria.observe.telemetry import _BATCH, PriorityDropQueue, TelemetryCollector


class SlowBus:
    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.delay, self.fail = delay, fail
        self.messages: list[tuple[str, BusEnvelope]] = []
        self.gate = threading.Event()

    def publish(self, stream: str, envelope: BusEnvelope) -> str:
        if self.delay:
            self.gate.wait(self.delay)
        if self.fail:
            raise ConnectionError("bus is down")
        self.messages.append((stream, envelope))
        return str(len(self.messages))

    def close(self) -> None:
        pass


def test_queue_drops_oldest_lowest_priority_first() -> None:
    q = PriorityDropQueue(3)
    q.put("low-1", MESSAGE_PRIORITY_LOW)
    q.put("normal-1", MESSAGE_PRIORITY_NORMAL)
    q.put("high-1", MESSAGE_PRIORITY_HIGH)
    q.put("normal-2", MESSAGE_PRIORITY_NORMAL)  # evicts low-1
    q.put("low-2", MESSAGE_PRIORITY_LOW)  # nothing lower to evict: dropped itself
    assert q.dropped == {MESSAGE_PRIORITY_LOW: 2, MESSAGE_PRIORITY_NORMAL: 0, MESSAGE_PRIORITY_HIGH: 0}
    assert [q.get(0.01) for _ in range(3)] == ["high-1", "normal-1", "normal-2"]


def test_publishing_never_blocks_on_a_stalled_bus() -> None:
    bus = SlowBus(delay=5.0)
    collector = TelemetryCollector(bus, queue_size=16)
    started = time.perf_counter()
    for i in range(500):
        collector.publish(collector.packet({"tolaria.train.loss": float(i)}))
    elapsed = time.perf_counter() - started
    summary = collector.summary()
    bus.gate.set()
    collector.close()
    assert elapsed < 1.0, f"500 publishes took {elapsed:.2f} s against a stalled bus"
    assert summary["dropped"] >= 500 - 16 - _BATCH - 1  # the queue, plus one batch in flight


def test_critical_packets_bypass_the_queue_to_the_emergency_stream() -> None:
    bus = SlowBus()
    collector = TelemetryCollector(bus)
    collector.publish(collector.packet({"x": 1.0}), MESSAGE_PRIORITY_CRITICAL)
    assert bus.messages and bus.messages[0][0] == "oona.emergency"
    collector.close()


def test_a_dead_bus_is_counted_not_raised() -> None:
    collector = TelemetryCollector(SlowBus(fail=True))
    collector.emit_event("tamiyo_timeout")
    collector.close(timeout_s=1.0)
    summary = collector.summary()
    assert summary["published"] == 0 and summary["publish_failures"] >= 1
    assert "bus is down" in summary["last_error"]


def test_packets_carry_metrics_units_and_events() -> None:
    bus = SlowBus()
    collector = TelemetryCollector(bus)
    collector.publish(collector.packet({"tolaria.epoch.duration_ms": 12.0},
                                       [collector.event("conservative_mode_entered", breakers="tamiyo")]))
    collector.close()
    stream, envelope = bus.messages[0]
    packet = TelemetryPacket.FromString(envelope.payload)
    assert stream == "oona.telemetry" and envelope.attributes["event_id"] == packet.packet_id
    assert packet.metrics[0].unit == "ms" and packet.events[0].description == "conservative_mode_entered"
    assert packet.events[0].attributes["breakers"] == "tamiyo"


def test_flush_waits_for_the_batch_in_flight_not_only_for_an_empty_queue() -> None:
    bus = SlowBus(delay=0.3)  # the publisher has taken the packet off the queue and is still sending it
    collector = TelemetryCollector(bus, queue_size=10)
    try:
        collector.publish(TelemetryPacket(packet_id="p1"), MESSAGE_PRIORITY_NORMAL)
        assert collector.flush(timeout_s=5.0)
        assert collector.published == 1 and len(bus.messages) == 1  # sent, and counted, by the time flush returns
    finally:
        collector.close()
