"""Nothing fails silently on Oona: a dead Redis is announced and spooled locally, and an oversized
entry is refused before any HMAC, dead-lettered as a bounded record and counted, never crashing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from job_toml import job_toml
from oona_support import SECRET
from redis_server import free_port

from esper.leyline import BUS_MESSAGE_TYPE_TELEMETRY, BusEnvelope, LeylineSizeError, TelemetryPacket
from esper.oona import BusRejected, EntryTooLarge, RedisBus, SpoolingBus, StreamNames, envelope_for, sign_payload
from esper.tolaria.cli import main
from esper.tolaria.observe.telemetry import TelemetryCollector


def _packet(size: int) -> BusEnvelope:
    return envelope_for(BUS_MESSAGE_TYPE_TELEMETRY, TelemetryPacket(packet_id="x" * size, source_subsystem="t"))


def test_a_run_at_a_dead_redis_warns_once_and_spools_what_it_could_not_publish(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ESPER_LEYLINE_SECRET", SECRET.decode())
    (tmp_path / "job.toml").write_text(job_toml("dead-redis", epochs=2, seed=1, tamiyo=""))
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    run = tmp_path / "run"
    assert main(["run", str(tmp_path / "job.toml"), "--run-dir", str(run), "--oona", url, "--quiet",
                 "--no-report"]) == 0
    err = capsys.readouterr().err
    assert err.count(f"cannot publish to Oona at {url}") == 1, err
    assert str(run / "telemetry.spool.jsonl") in err
    lines = [json.loads(line) for line in (run / "telemetry.spool.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    assert lines and summary["telemetry"]["spooled"] == len(lines)
    assert all(line["stream"] and "BusUnavailable" in line["error"] for line in lines)
    assert any("payload" in line for line in lines)  # decoded as in telemetry.jsonl


@pytest.mark.redis
def test_an_oversized_entry_is_refused_before_it_is_sent_and_counted(redis_url: str) -> None:
    streams = StreamNames(telemetry=f"t-{free_port()}.telemetry")
    bus = RedisBus(redis_url, streams=streams, secret=SECRET, max_entry_bytes=1000)
    try:
        with pytest.raises(EntryTooLarge, match=r"max_entry_bytes=1000") as refused:
            bus.publish("telemetry", _packet(2000))
        assert isinstance(refused.value, LeylineSizeError) and isinstance(refused.value, BusRejected)
        with pytest.raises(EntryTooLarge) as partly:
            bus.publish_many("telemetry", [_packet(10), _packet(2000), _packet(10)])
        assert len(partly.value.refused) == 1
        assert bus.length("telemetry") == 2 and bus.oversized_total == 2
    finally:
        bus.delete_stream("telemetry")
        bus.close()


@pytest.mark.redis
def test_an_oversized_entry_in_redis_is_dead_lettered_by_size_without_crashing_the_consumer(redis_url: str) -> None:
    prefix = f"t-{free_port()}"
    streams = StreamNames(normal=f"{prefix}.normal", deadletter=f"{prefix}.deadletter")
    bus = RedisBus(redis_url, streams=streams, secret=SECRET)
    raw = redis.Redis.from_url(redis_url)
    try:
        bus.ensure_group("normal", "g")
        huge = _packet(2 << 20).SerializeToString()  # validly signed, over the 1 MiB limit
        raw.xadd(streams.normal, {"payload": huge, "signature": sign_payload(huge, SECRET)})
        assert bus.consume("normal", "g", "c") == []
        letters = bus.dead_letters()
        assert len(letters) == 1 and letters[0].payload == b""
        assert f"{len(huge)} bytes exceeds the limit of 1048576 bytes" in letters[0].reason
        assert bus.oversized_total == 1
        assert bus.read("normal")[0] == [] and bus.rejected_total == 1  # a plain reader skips it too
    finally:
        raw.delete(streams.normal, streams.deadletter)
        raw.close()
        bus.close()


@pytest.mark.redis
def test_the_telemetry_publisher_counts_an_oversized_packet_and_spools_its_size_only(redis_url: str,
                                                                                      tmp_path: Path) -> None:
    streams = StreamNames(telemetry=f"t-{free_port()}.telemetry")
    warnings: list[str] = []
    bus = SpoolingBus(RedisBus(redis_url, streams=streams, secret=SECRET, max_entry_bytes=1000),
                      tmp_path / "spool.jsonl", warn=warnings.append)
    collector = TelemetryCollector(bus)
    try:
        collector.publish(TelemetryPacket(packet_id="x" * 5000, source_subsystem="t"))
        collector.publish(TelemetryPacket(packet_id="small", source_subsystem="t"))
        collector.close()  # drains the queue and stops the publisher thread
        assert collector.publish_failures >= 1 and bus.oversized_total == 1
        (record,) = [json.loads(line) for line in (tmp_path / "spool.jsonl").read_text().splitlines()]
        assert record["payload_bytes"] > 5000 and "payload" not in record and "EntryTooLarge" in record["error"]
        assert len(warnings) == 1
    finally:
        collector.close()
        bus.delete_stream("telemetry")
        bus.close()
