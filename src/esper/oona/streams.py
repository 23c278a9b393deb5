"""Oona stream names, envelope stamping and payload decoding shared by every bus.

Stream names follow LEYLINE.md ("Oona on Redis Streams"). They are configurable: a bus resolves
a logical name (`"telemetry"`) or a default name (`"oona.telemetry"`) to the configured one, so
code that publishes to the conventional names keeps working under a custom prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from google.protobuf.message import Message

from esper.leyline import (
    BUS_MESSAGE_TYPE_ADAPTATION_COMMAND,
    BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL,
    BUS_MESSAGE_TYPE_SYSTEM_STATE,
    BUS_MESSAGE_TYPE_TELEMETRY,
    AdaptationCommand,
    BusEnvelope,
    BusMessageType,
    EmergencySignal,
    SystemStatePacket,
    TelemetryPacket,
    new_id,
    parse,
)

EVENT_ID = "event_id"
REPLY_TO = "reply_to"
CORRELATION_ID = "correlation_id"

# The payload message of each bus message type that Leyline defines a message for. Other types
# (field reports, kernel prefetch, policy updates) travel as opaque bytes.
PAYLOAD_TYPES: dict[int, type[Message]] = {
    BUS_MESSAGE_TYPE_SYSTEM_STATE: SystemStatePacket,
    BUS_MESSAGE_TYPE_ADAPTATION_COMMAND: AdaptationCommand,
    BUS_MESSAGE_TYPE_TELEMETRY: TelemetryPacket,
    BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL: EmergencySignal,
}


@dataclass(frozen=True)
class StreamNames:
    """The five Oona streams. Defaults are the names Esper's other subsystems use."""

    normal: str = "oona.normal"
    telemetry: str = "oona.telemetry"
    emergency: str = "oona.emergency"
    policy: str = "oona.policy"
    deadletter: str = "oona.deadletter"

    def resolve(self, name: str) -> str:
        """Map a logical name (`telemetry`) or a default name (`oona.telemetry`) to the configured
        stream; any other name (a reply stream, say) is returned unchanged."""
        for f in fields(self):
            if name == f.name or name == f.default:
                return str(getattr(self, f.name))
        return name


def stamp_event_id(envelope: BusEnvelope) -> str:
    """Give `envelope` an idempotent `attributes["event_id"]` if it has none; return the id.

    Consumers de-duplicate on this id (at-least-once delivery may hand them an entry twice)."""
    event_id = envelope.attributes.get(EVENT_ID, "")
    if not event_id:
        event_id = new_id()
        envelope.attributes[EVENT_ID] = event_id
    return event_id


def envelope_for(message_type: int, message: Message, **attributes: str) -> BusEnvelope:
    """A BusEnvelope carrying `message` (serialized deterministically) with an event id."""
    envelope = BusEnvelope(message_type=message_type, payload=message.SerializeToString(deterministic=True))  # type: ignore[arg-type]
    envelope.attributes.update(attributes)
    stamp_event_id(envelope)
    return envelope


def decode_payload(envelope: BusEnvelope) -> Message | None:
    """The envelope's payload as its Leyline message, or None for a type Leyline has no message for.

    Raises `LeylineDecodeError` when the bytes do not parse as the declared type."""
    cls = PAYLOAD_TYPES.get(envelope.message_type)
    if cls is None:
        return None
    return parse(cls, envelope.payload)


def type_name(message_type: int) -> str:
    """`BUS_MESSAGE_TYPE_TELEMETRY` for 4; `BUS_MESSAGE_TYPE_<n>` for a number this build does not know."""
    try:
        return BusMessageType.Name(message_type)  # type: ignore[arg-type]
    except ValueError:
        return f"BUS_MESSAGE_TYPE_{message_type}"


__all__ = [
    "CORRELATION_ID",
    "EVENT_ID",
    "PAYLOAD_TYPES",
    "REPLY_TO",
    "StreamNames",
    "decode_payload",
    "envelope_for",
    "stamp_event_id",
    "type_name",
]
