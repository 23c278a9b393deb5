"""`watch`: decoded, signature-checked tail of the telemetry and emergency streams."""

from __future__ import annotations

import io
import threading

import pytest
from oona_support import SECRET
from rich.console import Console

from esper.leyline import (
    BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL,
    BUS_MESSAGE_TYPE_TELEMETRY,
    EMERGENCY_LEVEL_HALT,
    TELEMETRY_LEVEL_WARNING,
    EmergencySignal,
    MetricPoint,
    TelemetryEvent,
    TelemetryPacket,
)
from esper.oona import RedisBus, StreamNames, envelope_for
from esper.oona.watch import run_watch, watch

pytestmark = pytest.mark.redis


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=300, color_system=None), out


def _publish_sample(bus: RedisBus) -> None:
    packet = TelemetryPacket(packet_id="p", source_subsystem="tolaria", level=TELEMETRY_LEVEL_WARNING)
    packet.metrics.append(MetricPoint(name="tolaria.epoch.duration_ms", value=12.5, unit="ms"))
    packet.events.append(TelemetryEvent(description="tamiyo_timeout", attributes={"epoch": "3"}))
    bus.publish("telemetry", envelope_for(BUS_MESSAGE_TYPE_TELEMETRY, packet))
    signal = EmergencySignal(version=1, level=EMERGENCY_LEVEL_HALT, reason="loss is NaN", origin="tolaria")
    bus.publish("emergency", envelope_for(BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL, signal))


def test_watch_from_start_prints_decoded_telemetry_and_emergencies(bus: RedisBus, streams: StreamNames) -> None:
    _publish_sample(bus)
    bus._fast.xadd(streams.telemetry, {"payload": b"junk", "signature": "AAAA"})
    console, out = _console()
    shown = watch(bus.url, follow=False, from_start=True, names=streams, secret=SECRET, console=console)
    text = out.getvalue()
    assert shown == 3
    assert "WARNING" in text and "tolaria.epoch.duration_ms=12.5 ms" in text and "tamiyo_timeout(epoch=3)" in text
    assert "EMERGENCY HALT loss is NaN origin=tolaria" in text
    assert "✗ bad signature" in text and text.count("✓") == 2


def test_watch_without_secret_marks_entries_unverified(bus: RedisBus, streams: StreamNames) -> None:
    _publish_sample(bus)
    console, out = _console()
    watch(bus.url, follow=False, from_start=True, names=streams, secret=None, console=console)
    assert out.getvalue().count("? ") == 2 and "loss is NaN" in out.getvalue()


def test_watch_follow_starts_at_the_end_and_stops_at_the_limit(bus: RedisBus, streams: StreamNames) -> None:
    _publish_sample(bus)  # history, not shown
    console, out = _console()
    timer = threading.Timer(0.1, _publish_sample, args=(bus,))
    timer.start()
    shown = watch(bus.url, follow=True, limit=2, names=streams, secret=SECRET, console=console, block_ms=200)
    timer.join()
    assert shown == 2 and out.getvalue().count("✓") == 2


def test_run_watch_reports_an_unreachable_redis(capsys: pytest.CaptureFixture[str]) -> None:
    from redis_server import free_port  # type: ignore[import-not-found]

    assert run_watch(f"redis://127.0.0.1:{free_port()}/0", count=1, from_start=False) == 1
    assert "cannot reach" in capsys.readouterr().out
