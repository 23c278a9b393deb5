"""InProcessBus: subscribers, the JSONL sink, thread safety."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from esper.leyline import (
    BUS_MESSAGE_TYPE_FIELD_REPORT,
    BUS_MESSAGE_TYPE_TELEMETRY,
    BusEnvelope,
    MetricPoint,
    TelemetryPacket,
)
from esper.oona import InProcessBus, StreamNames, envelope_for


def _telemetry(i: int) -> BusEnvelope:
    packet = TelemetryPacket(packet_id=f"p{i}", source_subsystem="tolaria")
    packet.metrics.append(MetricPoint(name="tolaria.loss", value=float(i)))
    return envelope_for(BUS_MESSAGE_TYPE_TELEMETRY, packet)


def test_subscribers_receive_messages_of_their_stream_only() -> None:
    bus = InProcessBus(None)
    got: list[tuple[str, str]] = []
    bus.subscribe("oona.telemetry", lambda s, e: got.append((s, e.attributes["event_id"])))
    event_id = bus.publish("oona.telemetry", _telemetry(1))
    bus.publish("oona.emergency", _telemetry(2))
    bus.close()
    assert got == [("oona.telemetry", event_id)]


def test_unsubscribe_stops_delivery_and_a_failing_subscriber_is_counted() -> None:
    bus = InProcessBus(None)
    got: list[str] = []

    def broken(stream: str, envelope: BusEnvelope) -> None:
        raise RuntimeError("subscriber bug")

    bus.subscribe("telemetry", broken)
    stop = bus.subscribe("telemetry", lambda s, e: got.append(s))
    bus.publish("oona.telemetry", _telemetry(1))
    stop()
    bus.publish("oona.telemetry", _telemetry(2))
    assert got == ["oona.telemetry"] and bus.subscriber_errors == 2


def test_configured_stream_names_apply_to_conventional_names() -> None:
    bus = InProcessBus(None, streams=StreamNames(telemetry="run7.telemetry"))
    got: list[str] = []
    bus.subscribe("run7.telemetry", lambda s, e: got.append(s))
    bus.publish("oona.telemetry", _telemetry(1))
    assert got == ["run7.telemetry"]


def test_jsonl_lines_parse_with_decoded_payloads(tmp_path: Path) -> None:
    path = tmp_path / "run" / "telemetry.jsonl"
    bus = InProcessBus(path)
    bus.publish("oona.telemetry", _telemetry(3))
    bus.publish("oona.normal", BusEnvelope(message_type=BUS_MESSAGE_TYPE_FIELD_REPORT, payload=b"\x01\x02"))
    bus.publish("oona.normal", BusEnvelope(message_type=BUS_MESSAGE_TYPE_TELEMETRY, payload=b"\xff\xff"))
    bus.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["message_type"] for r in lines] == [
        "BUS_MESSAGE_TYPE_TELEMETRY", "BUS_MESSAGE_TYPE_FIELD_REPORT", "BUS_MESSAGE_TYPE_TELEMETRY"]
    first = lines[0]
    assert first["stream"] == "oona.telemetry" and first["time"] > 0 and first["attributes"]["event_id"]
    assert first["payload"]["metrics"][0] == {"name": "tolaria.loss", "value": 3.0}
    assert lines[1]["payload_bytes"] == 2
    assert "malformed" in lines[2]["payload_error"]


def test_periodic_flush_writes_without_close(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    bus = InProcessBus(path, flush_interval_s=0.02)
    bus.publish("oona.telemetry", _telemetry(1))
    deadline = time.monotonic() + 5
    while not path.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    written = path.read_text()
    bus.close()
    assert json.loads(written)["stream"] == "oona.telemetry"


def test_concurrent_publishers_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    bus = InProcessBus(path, flush_interval_s=0.01)
    seen: list[str] = []
    lock = threading.Lock()

    def record(stream: str, envelope: BusEnvelope) -> None:
        with lock:
            seen.append(envelope.attributes["event_id"])

    bus.subscribe("telemetry", record)
    threads = [threading.Thread(target=lambda k=k: [bus.publish("oona.telemetry", _telemetry(k * 1000 + i))
                                                    for i in range(250)]) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bus.close()
    ids = [json.loads(line)["attributes"]["event_id"] for line in path.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 2000
    assert sorted(seen) == sorted(ids)
    assert bus.published == 2000


def test_sink_queue_is_bounded(tmp_path: Path) -> None:
    bus = InProcessBus(tmp_path / "t.jsonl", flush_interval_s=60, max_pending=5)
    for i in range(8):
        bus.publish("oona.telemetry", _telemetry(i))
    bus.close()
    assert bus.sink_dropped == 3
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 5
