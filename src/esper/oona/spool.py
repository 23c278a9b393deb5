"""A remote bus that may be down keeps a local copy of what it could not publish.

`SpoolingBus` wraps a `RedisBus`: publishing is delegated, and every envelope whose publish
failed (Redis unreachable, refused, or the entry too large) is appended to a JSONL spool in the
same record shape as `telemetry.jsonl` plus `"error"`, so nothing a run produced is lost
silently. The first failure is announced once on stderr, naming the URL and the spool. The
failure is still raised: callers count it as before (the spool is a copy, not a delivery).
The spool file is created only on the first failure, so a healthy run has none.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from esper.leyline import BusEnvelope, LeylineSizeError
from esper.oona.errors import BusRejected, BusUnavailable, EntryTooLarge
from esper.oona.inprocess import envelope_record

SPOOL_FILE = "telemetry.spool.jsonl"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class SpoolingBus:
    """Delegates to `inner`; spools what `publish`/`publish_many` could not deliver (see module doc)."""

    def __init__(self, inner: Any, spool_path: Path | None, *, warn: Callable[[str], None] = _stderr) -> None:
        self.inner = inner
        self.spool_path = spool_path
        self.spooled = 0
        self._warn = warn
        self._warned = False
        self._lock = threading.Lock()
        self._file: IO[str] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # consume, ack, streams, ...: the wrapped bus's own

    def publish(self, stream: str, envelope: BusEnvelope) -> str:
        try:
            return str(self.inner.publish(stream, envelope))
        except (BusUnavailable, BusRejected) as exc:
            self._spool(stream, [envelope], exc)
            raise

    def publish_many(self, stream: str, envelopes: Iterable[BusEnvelope]) -> list[str]:
        batch = list(envelopes)
        try:
            return list(self.inner.publish_many(stream, batch))
        except (BusUnavailable, BusRejected) as exc:
            self._spool(stream, exc.refused if isinstance(exc, EntryTooLarge) else batch, exc)  # the rest was sent
            raise

    def _spool(self, stream: str, envelopes: list[BusEnvelope], exc: Exception) -> None:
        now = time.time()
        with self._lock:
            if not self._warned:
                self._warned = True
                where = f"a local copy goes to {self.spool_path}" if self.spool_path else "no local copy is kept"
                self._warn(f"tolaria: warning: cannot publish to Oona at {getattr(self.inner, 'url', '?')} "
                           f"({exc}); telemetry is not reaching Redis, {where}")
            if self.spool_path is None:
                return
            if self._file is None:
                self._file = self.spool_path.open("a", encoding="utf-8")
            for envelope in envelopes:
                self._file.write(json.dumps(_record(stream, envelope, now, exc)) + "\n")
            self._file.flush()
            self.spooled += len(envelopes)

    def summary(self) -> dict[str, Any]:
        return {"spooled": self.spooled, "spool": str(self.spool_path) if self.spooled else ""}

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        self.inner.close()


def _record(stream: str, envelope: BusEnvelope, published_at: float, exc: Exception) -> dict[str, Any]:
    if isinstance(exc, LeylineSizeError):  # an oversized entry is recorded by size, never copied whole
        record = {"time": published_at, "stream": stream, "attributes": dict(envelope.attributes),
                  "payload_bytes": len(envelope.payload)}
    else:
        record = envelope_record(stream, envelope, published_at)
    record["error"] = f"{type(exc).__name__}: {exc}"
    return record
