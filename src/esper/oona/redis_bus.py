"""Oona on Redis Streams (LEYLINE.md, "Oona on Redis Streams").

Each entry has two fields: `payload`, the serialized BusEnvelope, and `signature`, the base64
HMAC-SHA256 of those bytes. Consumers read with a consumer group (`XREADGROUP >`), acknowledge
with `XACK`, and take over entries a dead consumer left pending with `XAUTOCLAIM`; an entry that
fails `max_failures` times, or whose signature or envelope is bad, goes to the dead-letter stream.

Failure behaviour: every Redis call uses short socket timeouts and no client-side retries; a
connection error raises `BusUnavailable` at once, and a command Redis refuses raises
`BusRejected`. An entry larger than `max_entry_bytes` is refused before it is signed or sent
(`EntryTooLarge`, a `BusRejected` and a `LeylineSizeError`); one read from Redis is checked for
size before its HMAC and dead-lettered as a bounded record (its size, never its bytes); both
count in `oversized_total`. After a connection failure the bus refuses calls for a backoff delay (doubling up
to `backoff_max_s`) without touching the network, then tries again on the next call; a success
after failures counts one reconnect in `reconnects_total`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from esper.leyline import DEFAULT_MAX_MESSAGE_BYTES, BusEnvelope, LeylineDecodeError, parse
from esper.oona.errors import BusRejected, BusUnavailable, EntryTooLarge
from esper.oona.signing import load_secret, sign_payload, verify_payload
from esper.oona.streams import EVENT_ID, StreamNames, stamp_event_id

log = logging.getLogger(__name__)

Fields = dict[bytes, bytes]
MAX_SIGNATURE_BYTES = 256  # a base64 HMAC-SHA256 is 44
Entry = tuple[bytes, Fields | None]


@dataclass(frozen=True)
class Delivery:
    """One verified entry handed to a consumer. `times_delivered` counts deliveries to any
    consumer of the group (1 on the first read, higher after reclaims)."""

    stream: str
    entry_id: str
    envelope: BusEnvelope
    group: str = ""
    consumer: str = ""
    times_delivered: int = 1

    @property
    def event_id(self) -> str:
        return self.envelope.attributes.get(EVENT_ID, "")


@dataclass(frozen=True)
class DeadLetter:
    """An entry moved to the dead-letter stream, with where it came from and why."""

    entry_id: str
    stream: str
    source_entry_id: str
    group: str
    reason: str
    payload: bytes


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisBus:
    """Publish, consume, acknowledge and reclaim signed Leyline envelopes on Redis Streams.

    `secret=None` loads the shared secret from `ESPER_LEYLINE_SECRET` (raising `SecretMissing`
    when unset): Oona entries are always signed. Stream arguments accept configured names,
    logical names (`"telemetry"`) or default names (`"oona.telemetry"`), see `StreamNames.resolve`.
    Thread-safe: redis-py pools connections; the backoff state is guarded by a lock.
    """

    def __init__(self, url: str, *, streams: StreamNames = StreamNames(), maxlen: int = 100_000,
                 secret: bytes | None = None, socket_timeout: float = 0.25, read_timeout_s: float = 30.0,
                 max_failures: int = 5, reclaim_idle_ms: int = 60_000, backoff_initial_s: float = 0.05,
                 backoff_max_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 max_entry_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if maxlen < 1 or max_failures < 1 or reclaim_idle_ms < 0:
            raise ValueError(f"RedisBus: maxlen={maxlen} and max_failures={max_failures} must be >= 1, "
                             f"reclaim_idle_ms={reclaim_idle_ms} >= 0")
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError(f"RedisBus: need 0 < backoff_initial_s ({backoff_initial_s}) <= backoff_max_s "
                             f"({backoff_max_s})")
        if max_entry_bytes < 1:
            raise ValueError(f"RedisBus: max_entry_bytes={max_entry_bytes} must be >= 1")
        self.url = url
        self.streams = streams
        self.max_entry_bytes = max_entry_bytes
        self.maxlen = maxlen
        self.max_failures = max_failures
        self.reclaim_idle_ms = reclaim_idle_ms
        self.read_timeout_s = read_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._secret = secret if secret is not None else load_secret()
        self._clock = clock
        self._fast = self._client(url, socket_timeout, socket_timeout)
        # Blocking reads wait server-side up to block_ms, so they need a longer read timeout.
        self._blocking = self._client(url, socket_timeout, read_timeout_s)
        self._state_lock = threading.Lock()
        self._consecutive_failures = 0
        self._retry_at = 0.0
        self.last_error = ""
        self.reconnects_total = 0
        self.dead_lettered_total = 0
        self.rejected_total = 0
        self.oversized_total = 0

    @staticmethod
    def _client(url: str, connect_timeout: float, read_timeout: float) -> redis.Redis:
        # No client-side retries: a dead Redis must surface as one fast error, and reconnect
        # pacing is this class's backoff, not redis-py's.
        return redis.Redis.from_url(url, socket_timeout=read_timeout, socket_connect_timeout=connect_timeout,
                                    retry=Retry(NoBackoff(), 0), retry_on_timeout=False)

    # ------------------------------------------------------------------ connection state
    def _call(self, what: str, fn: Callable[[], Any], client: redis.Redis | None = None) -> Any:
        """Run one Redis operation under the fail-fast and backoff rules (redis-py replies are untyped)."""
        with self._state_lock:
            wait = self._retry_at - self._clock()
            if wait > 0:
                raise BusUnavailable(f"Oona Redis {self.url} is unavailable ({self.last_error}); "
                                     f"{what} refused, next attempt in {wait:.2f} s")
        try:
            result = fn()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._record_failure(exc, client or self._fast)
            raise BusUnavailable(f"Oona Redis {self.url}: {what} failed ({type(exc).__name__}: {exc}); "
                                 f"is redis-server running? retrying after backoff") from exc
        except redis.ResponseError as exc:
            raise BusRejected(f"Oona Redis {self.url} refused {what}: {exc}") from exc
        if self._consecutive_failures:
            with self._state_lock:
                if self._consecutive_failures:
                    self._consecutive_failures = 0
                    self.reconnects_total += 1
                    log.info("Oona Redis %s reachable again (reconnect %d)", self.url, self.reconnects_total)
        return result

    def _record_failure(self, exc: Exception, client: redis.Redis) -> None:
        # Drop pooled sockets: after a server restart they are dead and would fail once more.
        client.connection_pool.disconnect(inuse_connections=False)
        with self._state_lock:
            self._consecutive_failures += 1
            delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (self._consecutive_failures - 1))
            self._retry_at = self._clock() + delay
            self.last_error = f"{type(exc).__name__}: {exc}"

    @property
    def available(self) -> bool:
        """False while the bus is in a backoff window after a failure."""
        return self._consecutive_failures == 0

    # ------------------------------------------------------------------ publishing
    def _entry(self, envelope: BusEnvelope) -> dict[Any, Any] | None:
        """The signed fields, or None (counted) when the entry is over `max_entry_bytes`."""
        stamp_event_id(envelope)
        data = envelope.SerializeToString(deterministic=True)
        if len(data) > self.max_entry_bytes:  # checked before any HMAC or network work
            self.oversized_total += 1
            return None
        return {"payload": data, "signature": sign_payload(data, self._secret)}

    def _too_large(self, name: str, refused: list[BusEnvelope]) -> EntryTooLarge:
        sizes = ", ".join(str(len(e.payload)) for e in refused[:5])
        return EntryTooLarge(f"Oona {name}: {len(refused)} entr{'y' if len(refused) == 1 else 'ies'} of ~{sizes} "
                             f"bytes exceed max_entry_bytes={self.max_entry_bytes}; not published (send less "
                             f"per message or raise max_entry_bytes)", refused)

    def publish(self, stream: str, envelope: BusEnvelope) -> str:
        """XADD one signed entry (approximate MAXLEN trim); stamps `attributes["event_id"]` when
        absent. Returns the entry id. Raises `BusUnavailable` fast when Redis is unreachable and
        `EntryTooLarge` (nothing sent) for an entry over `max_entry_bytes`."""
        name = self.streams.resolve(stream)
        fields = self._entry(envelope)
        if fields is None:
            raise self._too_large(name, [envelope])
        entry_id = self._call("XADD", lambda: self._fast.xadd(name, fields, maxlen=self.maxlen, approximate=True))
        return _text(entry_id)

    def publish_many(self, stream: str, envelopes: Iterable[BusEnvelope]) -> list[str]:
        """Publish a batch in one pipelined round trip; returns the entry ids in order. Entries over
        `max_entry_bytes` are left out: the rest is published, then `EntryTooLarge` names them."""
        name = self.streams.resolve(stream)
        batch = list(envelopes)
        signed = [(env, self._entry(env)) for env in batch]
        entries = [fields for _, fields in signed if fields is not None]
        refused = [env for env, fields in signed if fields is None]

        def send() -> list[Any]:
            pipe = self._fast.pipeline(transaction=False)
            for fields in entries:
                pipe.xadd(name, fields, maxlen=self.maxlen, approximate=True)
            return pipe.execute()

        ids = [_text(entry_id) for entry_id in self._call("XADD pipeline", send)] if entries else []
        if refused:
            raise self._too_large(name, refused)
        return ids

    # ------------------------------------------------------------------ consumer groups
    def ensure_group(self, stream: str, group: str, start_id: str = "0") -> None:
        """Create consumer group `group` on `stream` (creating the stream); an existing group is kept."""
        name = self.streams.resolve(stream)
        try:
            self._call("XGROUP CREATE", lambda: self._fast.xgroup_create(name, group, id=start_id, mkstream=True))
        except BusRejected as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def consume(self, stream: str, group: str, consumer: str, *, count: int = 10,
                block_ms: int = 0) -> list[Delivery]:
        """XREADGROUP `>`: new entries for this consumer, verified. `block_ms=0` returns at once
        (unlike Redis, where BLOCK 0 waits forever); `block_ms` must stay below `read_timeout_s`.
        Entries with a bad signature or envelope are dead-lettered, never delivered."""
        name = self.streams.resolve(stream)
        client = self._blocking if block_ms > 0 else self._fast
        reply = self._call("XREADGROUP", lambda: client.xreadgroup(
            group, consumer, {name: ">"}, count=count, block=block_ms or None), client)
        entries: list[Entry] = [e for _, stream_entries in (reply or []) for e in stream_entries]
        return self._accept(name, entries, group, consumer, {})

    def ack(self, delivery: Delivery) -> None:
        """XACK: the group's consumer finished with this entry."""
        self._call("XACK", lambda: self._fast.xack(delivery.stream, delivery.group, delivery.entry_id))

    def reclaim(self, stream: str, group: str, consumer: str, *, min_idle_ms: int | None = None,
                count: int = 100) -> list[Delivery]:
        """XAUTOCLAIM entries pending longer than `min_idle_ms` (default `reclaim_idle_ms`) for
        `consumer`. An entry whose deliveries already failed `max_failures` times is moved to the
        dead-letter stream instead of being returned."""
        name = self.streams.resolve(stream)
        idle = self.reclaim_idle_ms if min_idle_ms is None else min_idle_ms
        reply = self._call("XAUTOCLAIM", lambda: self._fast.xautoclaim(name, group, consumer, idle, "0-0", count=count))
        entries: list[Entry] = list(reply[1])
        if not entries:
            return []
        return self._accept(name, entries, group, consumer, self._delivery_counts(name, group, entries))

    def _delivery_counts(self, stream: str, group: str, entries: Sequence[Entry]) -> dict[bytes, int]:
        def query() -> list[Any]:
            pipe = self._fast.pipeline(transaction=False)
            for entry_id, _ in entries:
                pipe.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
            return pipe.execute()

        counts: dict[bytes, int] = {}
        for rows in self._call("XPENDING", query):
            for row in rows:
                counts[row["message_id"]] = int(row["times_delivered"])
        return counts

    def _accept(self, stream: str, entries: Sequence[Entry], group: str, consumer: str,
                counts: dict[bytes, int]) -> list[Delivery]:
        out: list[Delivery] = []
        for raw_id, fields in entries:
            if fields is None:  # trimmed away while pending: nothing left to deliver
                continue
            times = counts.get(raw_id, 1)
            problem = self._problem(fields) or (
                f"failed {times - 1} deliveries (limit {self.max_failures})" if times - 1 >= self.max_failures else "")
            if problem:
                self._dead_letter(stream, _text(raw_id), fields, group, problem)
                continue
            envelope = parse(BusEnvelope, fields[b"payload"], max_bytes=self.max_entry_bytes)
            out.append(Delivery(stream, _text(raw_id), envelope, group, consumer, times))
        return out

    def _problem(self, fields: Fields) -> str:
        """Why an entry cannot be delivered, or "" when it can."""
        payload, signature = fields.get(b"payload"), fields.get(b"signature")
        if payload is None or signature is None:
            return "entry lacks the payload or signature field"
        if oversized := self._oversized(fields):  # before the HMAC: never hash an unbounded payload
            return oversized
        if not verify_payload(payload, signature, self._secret):
            return "bad signature (HMAC mismatch: tampered entry or a different ESPER_LEYLINE_SECRET)"
        try:
            parse(BusEnvelope, payload, max_bytes=self.max_entry_bytes)
        except LeylineDecodeError as exc:
            return f"malformed envelope: {exc}"
        return ""

    def _oversized(self, fields: Fields) -> str:
        """Why an entry read from Redis is too large to handle, or ""."""
        payload, signature = len(fields.get(b"payload", b"")), len(fields.get(b"signature", b""))
        if payload > self.max_entry_bytes:
            return f"entry of {payload} bytes exceeds the limit of {self.max_entry_bytes} bytes (max_entry_bytes)"
        if signature > MAX_SIGNATURE_BYTES:
            return f"signature field of {signature} bytes exceeds the limit of {MAX_SIGNATURE_BYTES} bytes"
        return ""

    def _dead_letter(self, stream: str, entry_id: str, fields: Fields, group: str, reason: str) -> None:
        log.warning("Oona: dead-lettering %s %s (group %s): %s", stream, entry_id, group or "-", reason)
        oversized = bool(self._oversized(fields))
        # A bounded record: an oversized entry is recorded by its size, never copied whole.
        record: dict[Any, Any] = {"payload": b"" if oversized else fields.get(b"payload", b""),
                                  "signature": b"" if oversized else fields.get(b"signature", b""),
                                  "payload_bytes": len(fields.get(b"payload", b"")),
                                  "stream": stream, "entry_id": entry_id, "group": group, "reason": reason}
        if oversized:
            self.oversized_total += 1

        def move() -> Any:
            pipe = self._fast.pipeline(transaction=True)
            pipe.xadd(self.streams.deadletter, record, maxlen=self.maxlen, approximate=True)
            if group:
                pipe.xack(stream, group, entry_id)
            return pipe.execute()

        self._call("dead-letter", move)
        self.dead_lettered_total += 1

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move a delivered entry the consumer cannot process (say, an unparseable payload) to the
        dead-letter stream and acknowledge it, so it is neither lost nor retried."""
        fields = {b"payload": delivery.envelope.SerializeToString(deterministic=True)}
        fields[b"signature"] = sign_payload(fields[b"payload"], self._secret).encode()
        self._dead_letter(delivery.stream, delivery.entry_id, fields, delivery.group, reason)

    # ------------------------------------------------------------------ plain reads
    def read(self, stream: str, last_id: str = "0-0", *, count: int = 100,
             block_ms: int = 0) -> tuple[list[Delivery], str]:
        """XREAD entries after `last_id` (no group); returns the verified deliveries and the
        cursor to pass next time. Entries failing verification are skipped, counted in
        `rejected_total` and logged (a plain reader does not own them, so nothing is dead-lettered)."""
        name = self.streams.resolve(stream)
        client = self._blocking if block_ms > 0 else self._fast
        reply = self._call("XREAD", lambda: client.xread({name: last_id}, count=count, block=block_ms or None), client)
        out: list[Delivery] = []
        cursor = last_id
        for _, stream_entries in reply or []:
            for raw_id, fields in stream_entries:
                cursor = _text(raw_id)
                problem = self._problem(fields)
                if problem:
                    self.rejected_total += 1
                    self.oversized_total += bool(self._oversized(fields))
                    log.warning("Oona: skipping %s %s: %s", name, cursor, problem)
                    continue
                envelope = parse(BusEnvelope, fields[b"payload"], max_bytes=self.max_entry_bytes)
                out.append(Delivery(name, cursor, envelope))
        return out, cursor

    def last_entry_id(self, stream: str) -> str:
        """Id of the newest entry of `stream`, or "0-0" when it is empty or missing."""
        name = self.streams.resolve(stream)
        rows = self._call("XREVRANGE", lambda: self._fast.xrevrange(name, count=1))
        return _text(rows[0][0]) if rows else "0-0"

    def length(self, stream: str) -> int:
        name = self.streams.resolve(stream)
        return int(self._call("XLEN", lambda: self._fast.xlen(name)))

    def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The oldest `count` dead letters, for operators and tests."""
        rows = self._call("XRANGE", lambda: self._fast.xrange(self.streams.deadletter, count=count))
        return [DeadLetter(_text(rid), _text(f[b"stream"]), _text(f[b"entry_id"]), _text(f[b"group"]),
                           _text(f[b"reason"]), f[b"payload"]) for rid, f in rows]

    def delete_stream(self, stream: str) -> None:
        name = self.streams.resolve(stream)
        self._call("DEL", lambda: self._fast.delete(name))

    def close(self) -> None:
        """Release the connection pools. Idempotent. Call it once no other thread uses the bus:
        redis-py fails calls in flight on a closed pool."""
        self._fast.close()
        self._blocking.close()
