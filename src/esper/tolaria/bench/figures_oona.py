"""Bench figures for Oona on Redis Streams. They need a Redis URL: the harness passes it in
the environment variable TOLARIA_BENCH_OONA (`tolaria bench --oona redis://…`)."""

from __future__ import annotations

import os
import time

from esper.leyline import (
    BUS_MESSAGE_TYPE_TELEMETRY,
    TELEMETRY_LEVEL_INFO,
    BusEnvelope,
    MetricPoint,
    TelemetryPacket,
    new_id,
    now_timestamp,
)
from esper.oona import RedisBus, StreamNames, envelope_for
from esper.tolaria.bench.registry import figure

BENCH_URL_ENV = "TOLARIA_BENCH_OONA"


def _bench_url() -> str:
    url = os.environ.get(BENCH_URL_ENV, "")
    if not url:
        raise RuntimeError(f"{BENCH_URL_ENV} is not set: run `tolaria bench --oona redis://HOST:PORT/DB`")
    return url


def _step_telemetry(step: int) -> BusEnvelope:
    """A per-step telemetry envelope as the collector sends it: eight metrics, ~400 bytes."""
    packet = TelemetryPacket(packet_id=new_id(), source_subsystem="tolaria", level=TELEMETRY_LEVEL_INFO)
    packet.timestamp.CopyFrom(now_timestamp())
    for name in ("loss", "lr", "grad_norm", "step_ms", "seeds.active", "seeds.alpha", "queue.depth", "dropped"):
        packet.metrics.append(MetricPoint(name=f"tolaria.step.{name}", value=step * 0.001, unit=""))
    return envelope_for(BUS_MESSAGE_TYPE_TELEMETRY, packet, priority="MESSAGE_PRIORITY_NORMAL",
                        source_subsystem="tolaria")


@figure("redis_events_per_s", unit="events/s", goal=10_000, better="higher", needs="redis")
def redis_events_per_s(quick: bool) -> list[float]:
    """Signed telemetry envelopes per second through `RedisBus.publish_many` (pipelined batches
    of 256, XADD with approximate MAXLEN), counting envelope serialization and HMAC signing,
    on a throwaway stream deleted afterwards. Goal ≥ 10 000 events/s."""
    streams = StreamNames(telemetry=f"bench.{new_id()[:12]}.telemetry")
    bus = RedisBus(_bench_url(), streams=streams, secret=os.urandom(32), maxlen=100_000)
    events, batch = (5_000, 256) if quick else (20_000, 256)
    trials = 3 if quick else 5
    out: list[float] = []
    try:
        bus.publish_many("telemetry", [_step_telemetry(i) for i in range(batch)])  # warm-up
        for _ in range(trials):
            envelopes = [_step_telemetry(i) for i in range(events)]
            start = time.perf_counter()
            for i in range(0, events, batch):
                bus.publish_many("telemetry", envelopes[i:i + batch])
            out.append(events / (time.perf_counter() - start))
    finally:
        bus.delete_stream("telemetry")
        bus.close()
    return out
