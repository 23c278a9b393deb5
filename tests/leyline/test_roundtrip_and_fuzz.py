"""Every Leyline message survives a round trip with every field set; garbage never crashes the parser."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.leyline import (
    LeylineDecodeError,
    LeylineError,
    LeylineSizeError,
    LeylineValidationError,
    parse,
    pb,
    seed_command,
    serialize,
    system_state_packet,
    validate_command,
    validate_system_state,
)

MESSAGES = [pb.DESCRIPTOR.message_types_by_name[n] for n in pb.DESCRIPTOR.message_types_by_name]


def _scalar(field: FieldDescriptor, salt: int) -> object:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-{salt}"
    if t == FieldDescriptor.TYPE_BYTES:
        return f"{field.name}{salt}".encode()
    if t == FieldDescriptor.TYPE_BOOL:
        return True
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return 1.5 + salt
    if t == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number
    return 7 + salt


def fill(msg: Message, depth: int = 0) -> Message:
    """Set every field (one oneof member at a time is the protobuf rule: the last one wins)."""
    descriptor: Descriptor = msg.DESCRIPTOR
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_f, val_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            mapping = getattr(msg, field.name)
            if val_f.message_type is None:
                mapping[_scalar(key_f, 1)] = _scalar(val_f, 1)
            continue
        if field.message_type is not None:
            if field.message_type.full_name.startswith("google.protobuf.Struct"):
                getattr(msg, field.name).update({"k": 1.0})
                continue
            if field.is_repeated:
                if depth < 3:
                    fill(getattr(msg, field.name).add(), depth + 1)
            elif depth < 3:
                fill(getattr(msg, field.name), depth + 1)
            continue
        if field.is_repeated:
            getattr(msg, field.name).append(_scalar(field, 0))
        else:
            setattr(msg, field.name, _scalar(field, 0))
    return msg


@pytest.mark.parametrize("descriptor", MESSAGES, ids=lambda d: d.name)
def test_every_message_round_trips_with_every_field_set(descriptor: Descriptor) -> None:
    cls = getattr(pb, descriptor.name)
    original = fill(cls())
    data = serialize(original)
    restored = parse(cls, data)
    assert restored == original
    assert serialize(restored) == data


@pytest.mark.parametrize("descriptor", MESSAGES, ids=lambda d: d.name)
@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=512))
def test_random_bytes_raise_a_typed_error_or_parse(descriptor: Descriptor, data: bytes) -> None:
    cls = getattr(pb, descriptor.name)
    try:
        parse(cls, data)
    except LeylineDecodeError:
        pass


@pytest.mark.parametrize("descriptor", MESSAGES, ids=lambda d: d.name)
def test_truncated_valid_messages_raise_a_typed_error_or_parse(descriptor: Descriptor) -> None:
    cls = getattr(pb, descriptor.name)
    data = serialize(fill(cls()))
    failures = 0
    for cut in range(len(data)):
        try:
            parse(cls, data[:cut])
        except LeylineDecodeError:
            failures += 1
    assert failures > 0, "some truncation of a fully populated message must be detected"


def test_oversize_bytes_are_refused_before_parsing() -> None:
    with pytest.raises(LeylineSizeError, match="exceeds the limit of 16 bytes"):
        parse(pb.SystemStatePacket, b"\x08\x01" * 20, max_bytes=16)


def test_non_bytes_input_is_a_decode_error() -> None:
    with pytest.raises(LeylineDecodeError, match="expected bytes"):
        parse(pb.SystemStatePacket, "text")  # type: ignore[arg-type]


def test_errors_share_one_base_class() -> None:
    assert issubclass(LeylineDecodeError, LeylineError) and issubclass(LeylineSizeError, LeylineError)


def test_builder_stamps_version_id_and_timestamp() -> None:
    packet = system_state_packet(epoch=3, global_step=120, training_loss=0.5, validation_loss=0.6,
                                 validation_accuracy=0.8)
    validate_system_state(packet)
    assert packet.version == 1 and len(packet.packet_id) == 32 and packet.timestamp_ns > 0
    assert packet.current_epoch == 3 and packet.global_step == 120


def test_packet_with_duplicate_seed_ids_is_invalid() -> None:
    packet = system_state_packet(epoch=1, global_step=1, training_loss=0, validation_loss=0, validation_accuracy=0,
                                 seed_states=[pb.SeedState(seed_id="a"), pb.SeedState(seed_id="a")])
    with pytest.raises(LeylineValidationError, match="repeats seed_id 'a'"):
        validate_system_state(packet)


def test_seed_command_validation_names_the_missing_target() -> None:
    cmd = seed_command(pb.SEED_OP_CULL, issued_by="tamiyo")
    with pytest.raises(LeylineValidationError, match="SEED_OP_CULL needs target_seed_id"):
        validate_command(cmd)
    validate_command(seed_command(pb.SEED_OP_CULL, issued_by="tamiyo", target_seed_id="seed1"))
