"""The shared-memory channel's exact contract: what the signal checksum covers, that a heartbeat
is visible to the owner, that a participant's close leaves the channel to its owner, and what a
segment that is not a channel gets."""

from __future__ import annotations

import hashlib
import os
import stat
import time
import uuid
from collections.abc import Iterator
from multiprocessing import shared_memory

import pytest

from esper.leyline import EmergencySignal
from esper.tolaria.recovery.signal import ChannelError, EmergencyChannel, segment_name, signal_checksum


@pytest.fixture()
def channel() -> Iterator[EmergencyChannel]:
    ch = EmergencyChannel.create(f"contract-{uuid.uuid4().hex[:10]}")
    yield ch
    ch.close()


def _signal(**fields: object) -> EmergencySignal:
    signal = EmergencySignal(version=1, level=4, reason="hung rank", origin="tolaria", run_id="r1",
                             monotonic_time_ms=42)
    for key, value in fields.items():
        setattr(signal, key, value)
    return signal


def test_the_signal_checksum_is_blake2b_16_of_every_field_but_itself() -> None:
    signal = _signal()
    expected = hashlib.blake2b(signal.SerializeToString(deterministic=True), digest_size=16).digest()
    assert signal_checksum(signal) == expected and len(expected) == 16
    signal.payload_checksum = b"anything"
    assert signal_checksum(signal) == expected  # its own field is cleared first
    assert signal.payload_checksum == b"anything"  # on a copy: the caller's signal is untouched
    for changed in (_signal(reason="other"), _signal(level=3), _signal(run_id="r2"), _signal(monotonic_time_ms=43)):
        assert signal_checksum(changed) != expected


def test_a_participants_heartbeat_is_visible_to_the_owner(channel: EmergencyChannel) -> None:
    slot = channel.register_participant("worker")
    before = time.monotonic_ns()
    channel.heartbeat(slot)
    after = time.monotonic_ns()
    [info] = [p for p in channel.participants() if p.slot == slot]
    assert before <= info.heartbeat_ns <= after


def test_a_participant_that_closes_leaves_the_channel_to_its_owner(channel: EmergencyChannel) -> None:
    attached = EmergencyChannel.attach(channel.run_name)
    attached.close()
    again = EmergencyChannel.attach(channel.run_name)  # the segment is still there
    assert again.sequence() == channel.sequence()
    again.close()


def test_a_segment_of_another_program_under_the_runs_name_is_refused_naming_it() -> None:
    run = f"contract-{uuid.uuid4().hex[:10]}"
    foreign = shared_memory.SharedMemory(name=segment_name(run), create=True, size=4096)
    try:
        foreign.buf[:8] = b"NOTESPER"
        with pytest.raises(ChannelError, match="is not an Esper emergency channel"):
            EmergencyChannel.attach(run)
        with pytest.raises(ChannelError, match="remove it or choose another run name"):
            EmergencyChannel.create(run)
    finally:
        foreign.close()
        foreign.unlink()


def _raise(channel: EmergencyChannel, reason: str) -> int:
    return channel.raise_signal(_signal(reason=reason))


def test_a_participant_joining_after_a_signal_owes_no_ack_for_it(channel: EmergencyChannel) -> None:
    seq = _raise(channel, "before it joined")
    slot = channel.register_participant("late-joiner")
    [info] = [p for p in channel.participants() if p.slot == slot]
    assert info.acked_seq == seq == channel.sequence()
    assert channel.acked(seq, [slot]) == {slot}
    assert channel.acked(_raise(channel, "after"), [slot]) == set()


def test_an_ack_records_the_sequence_and_refreshes_the_heartbeat(channel: EmergencyChannel) -> None:
    slot = channel.register_participant("worker")
    seq = _raise(channel, "hung rank")
    before = time.monotonic_ns()
    channel.ack(slot, seq)
    after = time.monotonic_ns()
    [info] = [p for p in channel.participants() if p.slot == slot]
    assert info.acked_seq == seq and before <= info.heartbeat_ns <= after


def test_a_released_slot_is_free_and_forgets_its_participant(channel: EmergencyChannel) -> None:
    first = channel.register_participant("first")
    channel.ack(first, _raise(channel, "one"))
    channel.release_participant(first)
    assert channel.participants() == [] and channel.live_participants() == []
    again = channel.register_participant("second")
    assert again == first
    [info] = channel.participants()
    assert (info.name, info.acked_seq) == ("second", channel.sequence())


def test_waiting_returns_the_signal_raised_after_the_given_sequence(channel: EmergencyChannel) -> None:
    channel.register_participant("waiter")  # waits on its doorbell
    seq = _raise(channel, "first")
    assert channel.wait(0, timeout_s=1.0).reason == "first"  # type: ignore[union-attr]
    assert channel.wait(seq, timeout_s=0.05) is None
    _raise(channel, "second")
    got = channel.wait_entry(seq, timeout_s=1.0)
    assert got is not None and got.signal.reason == "second"


def test_a_doorbell_is_readable_by_its_owner_only(channel: EmergencyChannel) -> None:
    slot = channel.register_participant("worker")
    mode = os.stat(channel._bell_path(slot)).st_mode  # noqa: SLF001 - the FIFO's permissions
    assert stat.S_ISFIFO(mode) and stat.S_IMODE(mode) == 0o600
