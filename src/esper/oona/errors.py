"""Typed errors of the Oona bus and of signed-command verification."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from esper.leyline import LeylineSizeError

RejectionCode = Literal["unsigned", "forged", "replayed", "stale", "future", "malformed"]


class BusUnavailable(ConnectionError):
    """The bus (Redis) cannot be reached right now. Raised fast, never after a long hang.

    Subclasses ConnectionError so callers that guard the bus with `except OSError` keep working."""


class BusRejected(RuntimeError):
    """Redis is up but refused the command (out of memory, read-only replica, a key of the wrong
    type). Not retried with backoff: the server answered; the message names its reply."""


class EntryTooLarge(BusRejected, LeylineSizeError):
    """An entry over the bus's `max_entry_bytes`: refused before it is signed or sent. `refused`
    holds the envelopes that were not published (the rest of a batch was)."""

    def __init__(self, message: str, refused: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.refused = list(refused)


class SecretMissing(RuntimeError):
    """Signing or verification is required but no shared secret is configured."""


class CommandRejected(ValueError):
    """A signed AdaptationCommand failed verification; `reason_code` says why.

    Codes: `unsigned` (no signature), `forged` (HMAC mismatch), `replayed` (command_id seen within
    the nonce window), `stale` (issued too long ago), `future` (issued too far ahead),
    `malformed` (missing id/timestamp, or bytes that do not parse)."""

    def __init__(self, reason_code: RejectionCode, message: str) -> None:
        super().__init__(f"{reason_code}: {message}")
        self.reason_code: RejectionCode = reason_code
