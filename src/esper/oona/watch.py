"""`tolaria watch redis://…`: tail Oona's telemetry and emergency streams, decoded, with rich.

A read-only viewer: it reads with plain XREAD (no consumer group, so it takes nothing from
the services) and checks each entry's signature when `ESPER_LEYLINE_SECRET` is set; without a
secret entries are shown marked unverified rather than refused.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import redis
from google.protobuf.message import Message
from rich.console import Console
from rich.text import Text

from esper.leyline import (
    BusEnvelope,
    EmergencyLevel,
    EmergencySignal,
    LeylineDecodeError,
    TelemetryLevel,
    TelemetryPacket,
    parse,
)
from esper.oona.errors import SecretMissing
from esper.oona.signing import load_secret, verify_payload
from esper.oona.streams import StreamNames, decode_payload, type_name

_LEVEL_STYLE = {1: "green", 2: "yellow", 3: "red", 4: "bold red"}


def _clock(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds).strftime("%H:%M:%S.%f")[:-3]


def _enum(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)


def _telemetry_text(packet: TelemetryPacket) -> Text:
    level = _enum(TelemetryLevel, packet.level, "TELEMETRY_LEVEL_")
    text = Text.assemble((f"{level:<8}", _LEVEL_STYLE.get(packet.level, "")), f" {packet.source_subsystem} ")
    metrics = "  ".join(f"{m.name}={m.value:.6g}{m.unit and ' ' + m.unit}" for m in packet.metrics)
    events = "  ".join(e.description + (f"({', '.join(f'{k}={v}' for k, v in sorted(e.attributes.items()))})"
                                        if e.attributes else "") for e in packet.events)
    text.append(metrics)
    if events:
        text.append(("  " if metrics else "") + events, style="bold")
    return text


def _emergency_text(signal: EmergencySignal) -> Text:
    level = _enum(EmergencyLevel, signal.level, "EMERGENCY_LEVEL_")
    return Text.assemble(("EMERGENCY " + level, "bold white on red"),
                         f" {signal.reason} origin={signal.origin or '-'} run={signal.run_id or '-'}")


def _body(envelope: BusEnvelope) -> Text:
    try:
        message: Message | None = decode_payload(envelope)
    except LeylineDecodeError as exc:
        return Text(f"undecodable {type_name(envelope.message_type)}: {exc}", style="red")
    if isinstance(message, TelemetryPacket):
        return _telemetry_text(message)
    if isinstance(message, EmergencySignal):
        return _emergency_text(message)
    return Text(f"{type_name(envelope.message_type)} ({len(envelope.payload)} bytes)", style="dim")


def render_entry(stream: str, entry_id: str, fields: dict[bytes, bytes], secret: bytes | None) -> Text:
    """One line for one stream entry: time, stream, signature mark, decoded payload."""
    seconds = int(entry_id.split("-")[0]) / 1000
    line = Text.assemble((_clock(seconds), "dim"), " ", (f"{stream:<16}", "cyan"), " ")
    payload, signature = fields.get(b"payload", b""), fields.get(b"signature", b"")
    if secret is None:
        line.append("? ", style="dim")
    elif verify_payload(payload, signature, secret):
        line.append("✓ ", style="green")
    else:
        return line.append("✗ bad signature: not decoded", style="bold red")
    try:
        envelope = parse(BusEnvelope, payload)
    except LeylineDecodeError as exc:
        return line.append(f"malformed envelope: {exc}", style="red")
    return line.append_text(_body(envelope))


def _start_ids(client: redis.Redis, names: Sequence[str], from_start: bool) -> dict[str, str]:
    # Resolve "$" to a concrete id now, so nothing published between two reads is skipped.
    cursors: dict[str, str] = {}
    for name in names:
        last: Any = None if from_start else client.xrevrange(name, count=1)
        cursors[name] = last[0][0].decode() if last else "0-0"
    return cursors


def watch(url: str, streams: Sequence[str] = ("telemetry", "emergency"), *, follow: bool = True,
          limit: int | None = None, from_start: bool = False, names: StreamNames = StreamNames(),
          secret: bytes | None = None, console: Console | None = None, block_ms: int = 1000) -> int:
    """Print entries of `streams` (logical or full names) as they arrive; returns how many were
    printed. `follow=False` stops when the streams are drained; `limit` stops after that many.
    Raises `redis.ConnectionError` when Redis cannot be reached."""
    console = console or Console()
    client = redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=block_ms / 1000 + 5)
    resolved = [names.resolve(s) for s in streams]
    cursors = _start_ids(client, resolved, from_start)
    shown = 0
    try:
        while limit is None or shown < limit:
            reply: Any = client.xread(cursors, count=100, block=block_ms if follow else None)  # type: ignore[arg-type]
            if not reply and not follow:
                break
            for raw_name, entries in reply or []:
                name = raw_name.decode()
                for raw_id, fields in entries:
                    cursors[name] = raw_id.decode()
                    if limit is not None and shown >= limit:
                        break
                    console.print(render_entry(name, cursors[name], fields, secret), soft_wrap=True)
                    shown += 1
    finally:
        client.close()
    return shown


def run_watch(url: str, *, count: int | None, from_start: bool) -> int:
    """Entry point for `tolaria watch`: returns the process exit code (0 ok, 1 Redis unreachable)."""
    console = Console()
    try:
        secret: bytes | None = load_secret()
    except SecretMissing:
        secret = None
        console.print("[dim]ESPER_LEYLINE_SECRET is not set: signatures are not checked (marked ?)[/dim]")
    try:
        watch(url, follow=True, limit=count, from_start=from_start, secret=secret, console=console)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        console.print(f"[red]tolaria watch: cannot reach {url}: {exc}; is redis-server running?[/red]")
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
