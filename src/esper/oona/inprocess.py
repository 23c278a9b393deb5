"""The embedded Oona bus: in-process subscribers plus an optional JSONL sink.

`publish` calls the stream's subscribers on the caller's thread and queues the envelope for the
sink; a background thread encodes and writes the queue every `flush_interval_s`, so the
training step never waits on disk or on JSON encoding. `close()` writes what is left.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from google.protobuf.json_format import MessageToDict

from esper.leyline import BusEnvelope, LeylineDecodeError
from esper.oona.streams import StreamNames, decode_payload, stamp_event_id, type_name

log = logging.getLogger(__name__)

Subscriber = Callable[[str, BusEnvelope], None]


def envelope_record(stream: str, envelope: BusEnvelope, published_at: float) -> dict[str, Any]:
    """The JSON object written for one message: time, stream, type name, attributes and the
    decoded payload (or its size when Leyline has no message for the type or the bytes are bad)."""
    record: dict[str, Any] = {
        "time": published_at,
        "stream": stream,
        "message_type": type_name(envelope.message_type),
        "attributes": dict(envelope.attributes),
    }
    try:
        message = decode_payload(envelope)
    except LeylineDecodeError as exc:
        record["payload_error"] = str(exc)
        message = None
    if message is not None:
        record["payload"] = MessageToDict(message, preserving_proto_field_name=True)
    else:
        record["payload_bytes"] = len(envelope.payload)
    return record


class InProcessBus:
    """Thread-safe in-process bus (the default when no Redis URL is configured).

    Subscribers registered for a stream get `(stream, envelope)` synchronously, in publish order
    per thread; a subscriber that raises is logged and counted, never breaks the publisher.
    At most `max_pending` messages wait for the sink; beyond that new ones are counted in
    `sink_dropped` instead of growing memory without bound. The bus keeps a reference to each
    published envelope until it is written: do not mutate an envelope after publishing it."""

    def __init__(self, jsonl_path: Path | None = None, *, streams: StreamNames = StreamNames(),
                 flush_interval_s: float = 0.5, max_pending: int = 100_000) -> None:
        if flush_interval_s <= 0:
            raise ValueError(f"flush_interval_s={flush_interval_s} must be > 0")
        self.streams = streams
        self.jsonl_path = jsonl_path
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.published = 0
        self.sink_dropped = 0
        self.subscriber_errors = 0
        self._subscribers: dict[str, list[Subscriber]] = {}
        self._pending: deque[tuple[str, BusEnvelope, float]] = deque()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._file: IO[str] | None = None
        self._thread: threading.Thread | None = None
        if jsonl_path is not None:
            jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = jsonl_path.open("a", encoding="utf-8")
            self._thread = threading.Thread(target=self._flush_loop, name="oona-jsonl", daemon=True)
            self._thread.start()

    def subscribe(self, stream: str, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(stream, envelope)` for every message published to `stream`.
        Returns a function that removes the subscription."""
        name = self.streams.resolve(stream)
        with self._lock:
            self._subscribers.setdefault(name, []).append(callback)

        def unsubscribe() -> None:
            with self._lock:
                callbacks = self._subscribers.get(name, [])
                if callback in callbacks:
                    callbacks.remove(callback)

        return unsubscribe

    def publish(self, stream: str, envelope: BusEnvelope) -> str:
        """Deliver to subscribers and queue for the sink; returns the envelope's event id."""
        if self._closed:
            raise RuntimeError("InProcessBus.publish after close(); create a new bus")
        name = self.streams.resolve(stream)
        event_id = stamp_event_id(envelope)
        with self._lock:
            self.published += 1
            callbacks = tuple(self._subscribers.get(name, ()))
            if self._file is not None:
                if len(self._pending) < self.max_pending:
                    self._pending.append((name, envelope, time.time()))
                else:
                    self.sink_dropped += 1
        for callback in callbacks:
            self._deliver(callback, name, envelope)
        return event_id

    def _deliver(self, callback: Subscriber, stream: str, envelope: BusEnvelope) -> None:
        try:
            callback(stream, envelope)
        except Exception:  # a broken subscriber must not stop the publisher; it is logged and counted
            self.subscriber_errors += 1
            log.exception("Oona subscriber %r failed on stream %s", callback, stream)

    def flush(self) -> None:
        """Write every queued message to the sink now."""
        with self._write_lock:
            with self._lock:
                batch = list(self._pending)
                self._pending.clear()
            if self._file is None or not batch:
                return
            lines = [json.dumps(envelope_record(*item), separators=(",", ":")) + "\n" for item in batch]
            self._file.writelines(lines)
            self._file.flush()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            try:
                self.flush()
            except OSError:  # disk trouble: keep the bus alive, say so, try again next interval
                log.exception("Oona JSONL sink %s: write failed", self.jsonl_path)

    def close(self) -> None:
        """Stop the flusher, write what is queued and close the sink. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
