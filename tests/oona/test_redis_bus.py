"""RedisBus against a real redis-server: round trips, signatures, reclaim, dead letters, trim, outages."""

from __future__ import annotations

import time

import pytest
from oona_support import SECRET

from esper.leyline import (
    BUS_MESSAGE_TYPE_ADAPTATION_COMMAND,
    BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL,
    BUS_MESSAGE_TYPE_FIELD_REPORT,
    BUS_MESSAGE_TYPE_SYSTEM_STATE,
    BUS_MESSAGE_TYPE_TELEMETRY,
    EMERGENCY_LEVEL_HALT,
    SEED_OP_GERMINATE,
    BusEnvelope,
    EmergencySignal,
    MetricPoint,
    TelemetryPacket,
    seed_command,
    system_state_packet,
)
from esper.oona import BusUnavailable, Deduplicator, RedisBus, SecretMissing, StreamNames, decode_payload, envelope_for

pytestmark = pytest.mark.redis


def _telemetry(i: int = 0) -> BusEnvelope:
    packet = TelemetryPacket(packet_id=f"p{i}", source_subsystem="tolaria")
    packet.metrics.append(MetricPoint(name="tolaria.loss", value=float(i)))
    return envelope_for(BUS_MESSAGE_TYPE_TELEMETRY, packet)


def test_every_leyline_payload_type_round_trips(bus: RedisBus) -> None:
    messages = {
        BUS_MESSAGE_TYPE_SYSTEM_STATE: system_state_packet(epoch=3, global_step=300, training_loss=0.5,
                                                           validation_loss=0.6, validation_accuracy=0.8),
        BUS_MESSAGE_TYPE_ADAPTATION_COMMAND: seed_command(SEED_OP_GERMINATE, issued_by="tamiyo", blueprint_id="b"),
        BUS_MESSAGE_TYPE_TELEMETRY: TelemetryPacket(packet_id="x", source_subsystem="tolaria"),
        BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL: EmergencySignal(version=1, level=EMERGENCY_LEVEL_HALT, reason="nan"),
    }
    bus.ensure_group("normal", "g")
    sent = {mt: envelope_for(mt, msg, origin="test") for mt, msg in messages.items()}
    for envelope in sent.values():
        bus.publish("normal", envelope)
    bus.publish("normal", BusEnvelope(message_type=BUS_MESSAGE_TYPE_FIELD_REPORT, payload=b"opaque"))
    got = bus.consume("normal", "g", "c1", count=10)
    assert [d.envelope.message_type for d in got] == [*messages, BUS_MESSAGE_TYPE_FIELD_REPORT]
    for delivery in got[:4]:
        mt = delivery.envelope.message_type
        assert decode_payload(delivery.envelope) == messages[mt]
        assert delivery.event_id == sent[mt].attributes["event_id"] and delivery.envelope.attributes["origin"] == "test"
    assert got[4].envelope.payload == b"opaque" and got[4].event_id
    for delivery in got:
        bus.ack(delivery)
    assert bus.consume("normal", "g", "c1") == []


def test_entry_fields_follow_the_oona_convention(bus: RedisBus, streams: StreamNames) -> None:
    import base64
    import hashlib
    import hmac

    entry_id = bus.publish("oona.telemetry", _telemetry())
    raw = bus._fast.xrange(streams.telemetry)
    assert [r[0].decode() for r in raw] == [entry_id]
    fields = raw[0][1]
    assert set(fields) == {b"payload", b"signature"}
    assert fields[b"signature"] == base64.b64encode(hmac.new(SECRET, fields[b"payload"], hashlib.sha256).digest())


def test_tampered_entry_is_dead_lettered_not_delivered(bus: RedisBus, streams: StreamNames) -> None:
    bus.ensure_group("telemetry", "g")
    good = bus.publish("telemetry", _telemetry(1))
    payload = _telemetry(2).SerializeToString()
    bad = bus._fast.xadd(streams.telemetry, {"payload": payload + b"x", "signature": "AAAA"}).decode()
    foreign = RedisBus(bus.url, streams=streams, secret=b"another-secret")
    wrong_key = foreign.publish("telemetry", _telemetry(3))
    got = bus.consume("telemetry", "g", "c")
    assert [d.entry_id for d in got] == [good]
    letters = bus.dead_letters()
    assert [(dl.source_entry_id, dl.stream, dl.group) for dl in letters] == [
        (bad, streams.telemetry, "g"), (wrong_key, streams.telemetry, "g")]
    assert "bad signature" in letters[0].reason and letters[0].payload == payload + b"x"
    assert bus._fast.xpending(streams.telemetry, "g")["pending"] == 1  # only the good one awaits its ACK
    foreign.close()


def test_crashed_consumer_entries_are_reclaimed_without_loss(bus: RedisBus) -> None:
    bus.ensure_group("normal", "svc")
    sent = [bus.publish("normal", _telemetry(i)) for i in range(5)]
    taken = bus.consume("normal", "svc", "consumer-a", count=3)  # A reads three and dies without ACK
    assert len(taken) == 3
    time.sleep(0.03)
    reclaimed = bus.reclaim("normal", "svc", "consumer-b", min_idle_ms=20)
    assert [d.entry_id for d in reclaimed] == sent[:3]
    assert all(d.times_delivered == 2 and d.consumer == "consumer-b" for d in reclaimed)
    rest = bus.consume("normal", "svc", "consumer-b", count=10)
    for d in reclaimed + rest:
        bus.ack(d)
    assert sorted(d.entry_id for d in reclaimed + rest) == sorted(sent)
    assert bus.reclaim("normal", "svc", "consumer-b", min_idle_ms=0) == []


def test_entry_failing_five_times_goes_to_dead_letter(bus: RedisBus) -> None:
    bus.ensure_group("normal", "svc")
    entry_id = bus.publish("normal", _telemetry())
    assert len(bus.consume("normal", "svc", "c0")) == 1  # failure 1: never acked
    for attempt in range(2, 6):
        got = bus.reclaim("normal", "svc", f"c{attempt}", min_idle_ms=0)
        assert [d.times_delivered for d in got] == [attempt]  # failures 2..5
    assert bus.reclaim("normal", "svc", "c6", min_idle_ms=0) == []
    letters = bus.dead_letters()
    assert [dl.source_entry_id for dl in letters] == [entry_id] and "failed 5 deliveries" in letters[0].reason
    assert bus.dead_lettered_total == 1


def test_reclaim_respects_min_idle(bus: RedisBus) -> None:
    bus.ensure_group("normal", "svc")
    bus.publish("normal", _telemetry())
    bus.consume("normal", "svc", "a")
    assert bus.reclaim("normal", "svc", "b", min_idle_ms=60_000) == []


def test_ensure_group_is_idempotent(bus: RedisBus) -> None:
    bus.ensure_group("normal", "svc")
    bus.publish("normal", _telemetry())
    bus.ensure_group("normal", "svc")
    assert len(bus.consume("normal", "svc", "a")) == 1


def test_maxlen_keeps_the_stream_near_its_cap(redis_url: str, streams: StreamNames) -> None:
    bus = RedisBus(redis_url, streams=streams, secret=SECRET, maxlen=200)
    for _ in range(10):
        bus.publish_many("telemetry", [_telemetry(i) for i in range(100)])
    length = bus.length("telemetry")
    bus.close()
    assert 200 <= length <= 400  # approximate trimming removes whole radix-tree nodes (100 entries each)


def test_plain_read_skips_forged_entries_and_returns_a_cursor(bus: RedisBus, streams: StreamNames) -> None:
    first = bus.publish("emergency", _telemetry(1))
    bus._fast.xadd(streams.emergency, {"payload": b"zz", "signature": "AAAA"})
    third = bus.publish("emergency", _telemetry(3))
    got, cursor = bus.read("emergency", "0-0")
    assert [d.entry_id for d in got] == [first, third] and cursor == third and bus.rejected_total == 1
    assert bus.read("emergency", cursor) == ([], cursor)
    assert bus.last_entry_id("emergency") == third and bus.last_entry_id("nothing-here") == "0-0"


def test_blocking_read_returns_when_an_entry_arrives(bus: RedisBus) -> None:
    import threading

    timer = threading.Timer(0.05, lambda: bus.publish("normal", _telemetry()))
    timer.start()
    got, _ = bus.read("normal", "$", block_ms=2000)
    timer.join()
    assert len(got) == 1


def test_redis_outage_fails_fast_then_reconnects(private_redis) -> None:
    bus = RedisBus(private_redis.url, secret=SECRET, backoff_initial_s=0.05, backoff_max_s=0.2)
    bus.publish("telemetry", _telemetry())
    private_redis.stop()
    for _ in range(5):
        start = time.perf_counter()
        with pytest.raises(BusUnavailable, match="Oona Redis"):
            bus.publish("telemetry", _telemetry())
        assert time.perf_counter() - start < 0.5
        time.sleep(0.06)
    assert not bus.available
    private_redis.start()
    deadline = time.monotonic() + 5
    while True:
        try:
            bus.publish("telemetry", _telemetry())
            break
        except BusUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert bus.reconnects_total == 1 and bus.available
    assert bus.length("telemetry") == 1  # the restarted server kept nothing (no persistence)
    bus.close()


def test_bus_unavailable_is_a_connection_error() -> None:
    assert issubclass(BusUnavailable, ConnectionError)


def test_redis_bus_without_secret_names_the_variable(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    monkeypatch.delenv("ESPER_LEYLINE_SECRET", raising=False)
    with pytest.raises(SecretMissing, match="ESPER_LEYLINE_SECRET"):
        RedisBus(redis_url)


def test_deduplicator_drops_repeated_event_ids_and_stays_bounded() -> None:
    dedup = Deduplicator(capacity=2)
    assert [dedup.seen(i) for i in ("a", "b", "a", "c", "b")] == [False, False, True, False, False]
    assert len(dedup) == 2 and dedup.duplicates == 1 and not dedup.seen("")


def test_a_command_redis_refuses_raises_bus_rejected_with_its_reply(bus: RedisBus, streams: StreamNames) -> None:
    from esper.oona import BusRejected

    bus._fast.set(streams.telemetry, "not a stream")
    with pytest.raises(BusRejected, match="WRONGTYPE"):
        bus.publish("telemetry", _telemetry())
    assert bus.available  # the server answered: no backoff
    bus._fast.delete(streams.telemetry)
