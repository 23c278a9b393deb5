"""Parsing and validation of Leyline bytes: every failure is a typed `LeylineError`.

Protobuf's own parser raises `DecodeError` for most garbage, but a few inputs (unknown
enum values, deep recursion, invalid UTF-8 in strings) surface as other exceptions; this
module funnels all of them into one error type that names the message and the problem.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from esper.leyline import leyline_pb2 as pb
from esper.leyline.errors import LeylineDecodeError, LeylineSizeError, LeylineValidationError

M = TypeVar("M", bound=Message)

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20  # 1 MiB: far above any control message, far below harm
HOT_PATH_TARGET_BYTES = 280  # SystemLimits.max_message_size_bytes design default


def parse(message_cls: type[M], data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> M:
    """Parse `data` as `message_cls`; raise `LeylineSizeError`/`LeylineDecodeError` on bad input."""
    name = message_cls.DESCRIPTOR.full_name
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise LeylineDecodeError(f"{name}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise LeylineSizeError(f"{name}: {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    msg = message_cls()
    try:
        msg.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise LeylineDecodeError(f"{name}: malformed protobuf ({exc})") from exc
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:
        raise LeylineDecodeError(f"{name}: unparseable bytes ({type(exc).__name__}: {exc})") from exc
    return msg


def serialize(message: Message, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
    """Serialize deterministically, refusing messages larger than `max_bytes`."""
    data = message.SerializeToString(deterministic=True)
    if len(data) > max_bytes:
        raise LeylineSizeError(
            f"{message.DESCRIPTOR.full_name}: {len(data)} bytes exceeds the limit of {max_bytes} bytes"
        )
    return data


def validate_system_state(packet: pb.SystemStatePacket) -> None:
    """Check the rules a SystemStatePacket must satisfy beyond protobuf's types."""
    if packet.version == 0:
        raise LeylineValidationError("SystemStatePacket.version is 0: stamp it with a builder")
    if not packet.packet_id:
        raise LeylineValidationError("SystemStatePacket.packet_id is empty")
    if packet.timestamp_ns == 0:
        raise LeylineValidationError("SystemStatePacket.timestamp_ns is 0")
    seen: set[str] = set()
    for seed in packet.seed_states:
        if not seed.seed_id:
            raise LeylineValidationError("SystemStatePacket.seed_states has a seed without seed_id")
        if seed.seed_id in seen:
            raise LeylineValidationError(f"SystemStatePacket.seed_states repeats seed_id {seed.seed_id!r}")
        seen.add(seed.seed_id)


def validate_command(command: pb.AdaptationCommand) -> None:
    """Check the structural rules an AdaptationCommand must satisfy before it may be applied."""
    if command.version == 0:
        raise LeylineValidationError("AdaptationCommand.version is 0")
    if not command.command_id:
        raise LeylineValidationError("AdaptationCommand.command_id is empty")
    if command.command_type == pb.COMMAND_UNKNOWN:
        raise LeylineValidationError("AdaptationCommand.command_type is COMMAND_UNKNOWN")
    if command.command_type not in pb.CommandType.values():
        raise LeylineValidationError(
            f"AdaptationCommand.command_type {command.command_type} is not a known CommandType"
        )
    payload = command.WhichOneof("payload")
    if command.command_type == pb.COMMAND_SEED:
        if payload != "seed_operation":
            raise LeylineValidationError("COMMAND_SEED needs a seed_operation payload")
        op = command.seed_operation.operation
        if op == pb.SEED_OP_UNKNOWN or op not in pb.SeedOperation.values():
            raise LeylineValidationError(f"COMMAND_SEED has an unknown seed operation {op}")
        if op != pb.SEED_OP_GERMINATE and not command.target_seed_id:
            raise LeylineValidationError(f"{pb.SeedOperation.Name(op)} needs target_seed_id")
    if command.command_type == pb.COMMAND_OPTIMIZER and payload != "optimizer_adjustment":
        raise LeylineValidationError("COMMAND_OPTIMIZER needs an optimizer_adjustment payload")
    if command.command_type == pb.COMMAND_CIRCUIT_BREAKER and payload != "circuit_breaker":
        raise LeylineValidationError("COMMAND_CIRCUIT_BREAKER needs a circuit_breaker payload")
