"""esper.oona: the message bus carrying Leyline envelopes between Esper's subsystems.

`InProcessBus` is the embedded default (subscribers + JSONL sink); `RedisBus` speaks Oona on
Redis Streams as Esper's other subsystems do (signed entries, consumer groups, reclaim, dead
letters). `signing` holds the shared-secret HMAC conventions for entries and commands.
"""

from esper.oona.dedup import Deduplicator
from esper.oona.errors import (
    BusRejected,
    BusUnavailable,
    CommandRejected,
    EntryTooLarge,
    RejectionCode,
    SecretMissing,
)
from esper.oona.inprocess import InProcessBus
from esper.oona.redis_bus import DeadLetter, Delivery, RedisBus
from esper.oona.signing import (
    SECRET_ENV,
    CommandVerifier,
    load_secret,
    sign_command,
    sign_payload,
    verify_payload,
)
from esper.oona.spool import SPOOL_FILE, SpoolingBus
from esper.oona.streams import StreamNames, decode_payload, envelope_for, stamp_event_id

__all__ = [
    "SECRET_ENV",
    "SPOOL_FILE",
    "BusRejected",
    "BusUnavailable",
    "CommandRejected",
    "CommandVerifier",
    "DeadLetter",
    "Deduplicator",
    "Delivery",
    "EntryTooLarge",
    "InProcessBus",
    "RedisBus",
    "RejectionCode",
    "SecretMissing",
    "SpoolingBus",
    "StreamNames",
    "decode_payload",
    "envelope_for",
    "load_secret",
    "sign_command",
    "sign_payload",
    "stamp_event_id",
    "verify_payload",
]
