"""`tolaria watch redis://…`: tail Oona's telemetry and emergency streams, decoded, with rich.

A read-only viewer: it reads with plain XREAD (no consumer group, so it takes nothing from
the services) and checks each entry's signature when `ESPER_LEYLINE_SECRET` is set; without a
secret entries are shown marked unverified rather than refused.

Each line names the run that published it (the envelope's `run_id`, or an emergency signal's)
and, for an epoch's or a step's figures, the epoch or step. Ratios (accuracies) are printed as
percentages. A run's `run_started` and `run_ended` events are printed as markers. Filters:
`run` keeps one run's entries; `min_level` keeps entries at or above a severity (telemetry
levels and emergency levels share one 1-4 scale: info/notice, warning/elevated,
error/conservative, critical/halt), run markers excepted, since they frame what is shown.
An entry whose signature does not verify is not decoded: the first one prints a hint about
the secret, later ones are only counted (a wrong secret fails every entry).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
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
    MetricPoint,
    TelemetryEvent,
    TelemetryLevel,
    TelemetryPacket,
    parse,
)
from esper.oona.errors import SecretMissing
from esper.oona.signing import SECRET_ENV, load_secret, verify_payload
from esper.oona.streams import StreamNames, decode_payload, type_name

_LEVEL_STYLE = {1: "green", 2: "yellow", 3: "red", 4: "bold red"}
# Severity names `--level` takes: telemetry levels, emergency wire levels, and the design's names.
LEVELS = {"info": 1, "notice": 1, "minor": 1, "warning": 2, "elevated": 2, "major": 2,
          "error": 3, "conservative": 3, "severe": 3, "critical": 4, "halt": 4}
# The run markers Tolaria's telemetry publishes (spelled here: Oona never imports Tolaria).
RUN_STARTED, RUN_ENDED = "run_started", "run_ended"
BAD_SIGNATURE_HINT = (f"bad signature: check {SECRET_ENV} matches the run's (later entries with bad "
                      "signatures are counted, not shown)")
DEFAULT_STREAMS = ("telemetry", "emergency")


def parse_level(name: str) -> int:
    """The 1-4 severity of a level name; a ValueError naming the choices for anything else."""
    level = LEVELS.get(name.strip().lower())
    if level is None:
        raise ValueError(f"--level {name!r} is not a level: use info, warning, error or critical "
                         "(or the emergency names notice, elevated, conservative, halt)")
    return level


def _clock(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds).strftime("%H:%M:%S.%f")[:-3]


def _enum(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)


@dataclass
class Entry:
    """One stream entry, checked and decoded once; `problem` says why it was not decoded."""

    stream: str
    entry_id: str
    mark: str  # "?" unverified, "✓" verified, "✗" bad signature
    envelope: BusEnvelope | None = None
    message: Message | None = None
    problem: str = ""

    @property
    def seconds(self) -> float:
        return int(self.entry_id.split("-")[0]) / 1000

    @property
    def run_id(self) -> str:
        if isinstance(self.message, EmergencySignal) and self.message.run_id:
            return str(self.message.run_id)
        return str(self.envelope.attributes.get("run_id", "")) if self.envelope is not None else ""

    @property
    def level(self) -> int:
        """The entry's severity on the shared 1-4 scale (0: none, e.g. not decoded)."""
        if isinstance(self.message, (TelemetryPacket, EmergencySignal)):
            return int(self.message.level)
        return 0

    @property
    def is_run_marker(self) -> bool:
        return isinstance(self.message, TelemetryPacket) and any(
            e.description in (RUN_STARTED, RUN_ENDED) for e in self.message.events)


def read_entry(stream: str, entry_id: str, fields: dict[bytes, bytes], secret: bytes | None) -> Entry:
    """Check the signature (when there is a secret) and decode the envelope and its payload."""
    payload, signature = fields.get(b"payload", b""), fields.get(b"signature", b"")
    if secret is None:
        mark = "?"
    elif verify_payload(payload, signature, secret):
        mark = "✓"
    else:
        return Entry(stream, entry_id, "✗", problem="bad signature")
    try:
        envelope = parse(BusEnvelope, payload)
    except LeylineDecodeError as exc:
        return Entry(stream, entry_id, mark, problem=f"malformed envelope: {exc}")
    try:
        message = decode_payload(envelope)
    except LeylineDecodeError as exc:
        return Entry(stream, entry_id, mark, envelope, problem=f"undecodable {type_name(envelope.message_type)}: {exc}")
    return Entry(stream, entry_id, mark, envelope, message)


@dataclass(frozen=True)
class WatchFilter:
    """Which decoded entries are shown: one run's (`run`), at or above `min_level`."""

    run: str | None = None
    min_level: int = 0

    def accepts(self, entry: Entry) -> bool:
        if self.run is not None and entry.run_id != self.run:
            return False
        return entry.is_run_marker or entry.level >= self.min_level


def _metric_text(metric: MetricPoint) -> str:
    if metric.unit == "ratio":
        return f"{metric.name}={metric.value * 100:.1f} %"
    return f"{metric.name}={metric.value:.6g}{metric.unit and ' ' + metric.unit}"


def _position(packet: TelemetryPacket) -> str:
    """`epoch 3` or `step 150` for a packet of an epoch's or a step's figures."""
    for metric in packet.metrics:
        for key in ("epoch", "step"):
            if key in metric.attributes:
                return f"{key} {metric.attributes[key]}"
    return ""


def _event_text(event: TelemetryEvent) -> str:
    attributes = ", ".join(f"{k}={v}" for k, v in sorted(event.attributes.items()))
    return event.description + (f"({attributes})" if attributes else "")


def _marker_text(event: TelemetryEvent) -> Text:
    a = event.attributes
    if event.description == RUN_STARTED:
        where = (f"resumed from {a.get('resumed_from')} at epoch {a.get('epoch')}" if a.get("resumed_from")
                 else f"started at epoch {a.get('epoch')}")
        return Text(f"▶ run {a.get('run_id', '-')} {where} (step {a.get('step')}) of {a.get('epochs')} epochs",
                    style="bold cyan")
    reason = f": {a.get('reason')}" if a.get("reason") else ""
    style = "bold red" if a.get("status") == "failed" else "bold cyan"
    return Text(f"■ run {a.get('run_id', '-')} {a.get('status', 'ended')}{reason} at epoch {a.get('epoch')} "
                f"(step {a.get('step')})", style=style)


def _telemetry_text(packet: TelemetryPacket, run_id: str) -> Text:
    markers = [e for e in packet.events if e.description in (RUN_STARTED, RUN_ENDED)]
    if markers:
        return _marker_text(markers[0])
    level = _enum(TelemetryLevel, packet.level, "TELEMETRY_LEVEL_")
    text = Text.assemble((f"{level:<8}", _LEVEL_STYLE.get(packet.level, "")), f" {packet.source_subsystem} ")
    if run_id:
        text.append(f"run={run_id} ", style="magenta")
    position = _position(packet)
    if position:
        text.append(f"{position}  ", style="bold")
    metrics = "  ".join(_metric_text(m) for m in packet.metrics)
    events = "  ".join(_event_text(e) for e in packet.events)
    text.append(metrics)
    if events:
        text.append(("  " if metrics else "") + events, style="bold")
    return text


def _emergency_text(signal: EmergencySignal) -> Text:
    level = _enum(EmergencyLevel, signal.level, "EMERGENCY_LEVEL_")
    return Text.assemble(("EMERGENCY " + level, "bold white on red"),
                         f" {signal.reason} origin={signal.origin or '-'} run={signal.run_id or '-'}")


def render(entry: Entry) -> Text:
    """One line for one entry: time, stream, signature mark, decoded payload."""
    line = Text.assemble((_clock(entry.seconds), "dim"), " ", (f"{entry.stream:<16}", "cyan"), " ")
    if entry.mark == "✗":
        return line.append(f"✗ {BAD_SIGNATURE_HINT}", style="bold red")
    line.append(f"{entry.mark} ", style="green" if entry.mark == "✓" else "dim")
    if entry.problem:
        return line.append(entry.problem, style="red")
    if isinstance(entry.message, TelemetryPacket):
        return line.append_text(_telemetry_text(entry.message, entry.run_id))
    if isinstance(entry.message, EmergencySignal):
        return line.append_text(_emergency_text(entry.message))
    envelope = entry.envelope or BusEnvelope()  # an entry without a problem was parsed
    return line.append(f"{type_name(envelope.message_type)} ({len(envelope.payload)} bytes)", style="dim")


def render_entry(stream: str, entry_id: str, fields: dict[bytes, bytes], secret: bytes | None) -> Text:
    """One line for one raw stream entry (`read_entry` then `render`)."""
    return render(read_entry(stream, entry_id, fields, secret))


def _start_ids(client: redis.Redis, names: Sequence[str], from_start: bool) -> dict[str, str]:
    # Resolve "$" to a concrete id now, so nothing published between two reads is skipped.
    cursors: dict[str, str] = {}
    for name in names:
        last: Any = None if from_start else client.xrevrange(name, count=1)
        cursors[name] = last[0][0].decode() if last else "0-0"
    return cursors


class _Printer:
    """Prints the entries a filter accepts; bad signatures get one hint, then a count."""

    def __init__(self, console: Console, where: WatchFilter) -> None:
        self.console, self.filter = console, where
        self.shown = self.bad_signatures = 0

    def offer(self, entry: Entry) -> None:
        if entry.mark == "✗":
            self.bad_signatures += 1
            if self.bad_signatures > 1:
                return
        elif not self.filter.accepts(entry):
            return
        self.console.print(render(entry), soft_wrap=True)
        self.shown += 1

    def close(self) -> None:
        if self.bad_signatures > 1:
            self.console.print(f"[red]{self.bad_signatures} entries had bad signatures (only the first is shown); "
                               f"check {SECRET_ENV}[/red]")


def watch(url: str, streams: Sequence[str] = DEFAULT_STREAMS, *, follow: bool = True,
          limit: int | None = None, from_start: bool = False, names: StreamNames = StreamNames(),
          secret: bytes | None = None, console: Console | None = None, block_ms: int = 1000,
          where: WatchFilter = WatchFilter()) -> int:
    """Print entries of `streams` (logical or full names) that `where` accepts as they arrive;
    returns how many lines were printed. `follow=False` stops when the streams are drained;
    `limit` stops after that many. Raises `redis.ConnectionError` when Redis cannot be reached."""
    printer = _Printer(console or Console(), where)
    client = redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=block_ms / 1000 + 5)
    cursors = _start_ids(client, [names.resolve(s) for s in streams], from_start)
    try:
        while limit is None or printer.shown < limit:
            reply: Any = client.xread(cursors, count=100, block=block_ms if follow else None)  # type: ignore[arg-type]
            if not reply and not follow:
                break
            for raw_name, entries in reply or []:
                name = raw_name.decode()
                for raw_id, fields in entries:
                    cursors[name] = raw_id.decode()
                    if limit is not None and printer.shown >= limit:
                        break
                    printer.offer(read_entry(name, cursors[name], fields, secret))
    finally:
        client.close()
        printer.close()
    return printer.shown


def run_watch(url: str, *, count: int | None, from_start: bool, run: str | None = None, level: str | None = None,
              streams: Sequence[str] | None = None) -> int:
    """Entry point for `tolaria watch`: returns the process exit code (0 ok, 1 Redis unreachable).
    A level name it does not know raises ValueError (the CLI prints it as one line)."""
    where = WatchFilter(run=run or None, min_level=parse_level(level) if level else 0)
    console = Console()
    try:
        secret: bytes | None = load_secret()
    except SecretMissing:
        secret = None
        console.print(f"[dim]{SECRET_ENV} is not set: signatures are not checked (marked ?)[/dim]")
    try:
        watch(url, tuple(streams or DEFAULT_STREAMS), follow=True, limit=count, from_start=from_start, secret=secret,
              console=console, where=where)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        console.print(f"[red]tolaria watch: cannot reach {url}: {exc}; is redis-server running?[/red]")
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
