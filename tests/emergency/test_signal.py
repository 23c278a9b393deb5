"""Shared-memory emergency channel: seqlock under a busy reader, stale segments, real processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import struct
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from emergency_workers import acking_participant, busy_reader, is_consistent, numbered_signal

from esper.leyline import EMERGENCY_LEVEL_HALT, EmergencySignal
from esper.tolaria.recovery import signal as sig
from esper.tolaria.recovery.signal import ChannelBusyError, ChannelError, EmergencyChannel

SPAWN = mp.get_context("spawn")


@pytest.fixture()
def run_name() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture()
def channel(run_name: str) -> Iterator[EmergencyChannel]:
    ch = EmergencyChannel.create(run_name, n_slots=8)
    yield ch
    ch.close()


def _wait_for_participants(channel: EmergencyChannel, n: int, timeout_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        live = channel.live_participants()
        if len(live) >= n:
            return live
        time.sleep(0.005)
    raise TimeoutError(f"only {channel.live_participants()} registered")


def test_layout_fits_its_documented_offsets() -> None:
    assert sig._PAYLOAD_OFFSET + sig.MAX_PAYLOAD_BYTES <= sig._SLOTS_OFFSET
    assert sig._SLOT.size <= sig._SLOT_SIZE
    assert struct.calcsize("<8sIIqq") == sig._SEQ_OFFSET


def test_signal_round_trips_with_sequence_and_missed_count(channel: EmergencyChannel, run_name: str) -> None:
    reader = EmergencyChannel.attach(run_name)
    try:
        assert reader.read(0) is None
        first = channel.raise_signal(numbered_signal(1))
        channel.raise_signal(numbered_signal(2))
        last = channel.raise_signal(numbered_signal(3))
        got = reader.read(first)
        assert got is not None and got.seq == last and got.missed == 1
        assert got.signal == numbered_signal(3)
        assert reader.read(last) is None
    finally:
        reader.close()


def test_wait_returns_none_at_timeout_without_sleeping_long(channel: EmergencyChannel) -> None:
    assert channel.wait(after_seq=0, timeout_s=0.02) is None


def test_long_reason_is_truncated_and_oversize_signal_refused(channel: EmergencyChannel) -> None:
    seq = channel.raise_signal(EmergencySignal(version=1, level=EMERGENCY_LEVEL_HALT, reason="r" * 5000))
    got = channel.read(0)
    assert got is not None and got.seq == seq and got.signal.reason.endswith("[truncated]")
    assert len(got.signal.reason.encode()) <= sig.MAX_REASON_BYTES
    huge = EmergencySignal(version=1, level=EMERGENCY_LEVEL_HALT, attributes={"k": "v" * 2000})
    with pytest.raises(ChannelError, match="shorten its attributes"):
        channel.raise_signal(huge)


def test_a_tampered_record_is_rejected_not_returned(channel: EmergencyChannel) -> None:
    channel.raise_signal(numbered_signal(7))
    buf = channel._buf
    buf[sig._PAYLOAD_OFFSET + 3] ^= 0xFF  # simulate a store that landed after the even sequence
    assert channel.read(0) is None
    assert channel.torn_rejected > 0


def test_second_owner_of_a_live_run_is_refused(channel: EmergencyChannel, run_name: str) -> None:
    with pytest.raises(ChannelBusyError, match=f"run '{run_name}' is already active in pid {os.getpid()}"):
        EmergencyChannel.create(run_name)


def test_stale_segment_of_a_dead_owner_is_cleaned_on_create(run_name: str) -> None:
    dead = SPAWN.Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    stale = EmergencyChannel.create(run_name)
    stale.raise_signal(numbered_signal(5))
    struct.pack_into("<q", stale._buf, 16, dead.pid)  # the owner pid now names a finished process
    sig._OWNED.discard(stale.name)
    stale.owner = False  # simulate a crash: detach without unlinking
    stale.close()
    fresh = EmergencyChannel.create(run_name)
    try:
        assert fresh.stale_cleaned and fresh.owner_pid == os.getpid()
        assert fresh.sequence() == 0 and fresh.read(0) is None
    finally:
        fresh.close()


def test_attach_without_owner_names_the_fix(run_name: str) -> None:
    with pytest.raises(ChannelError, match="start the run's trainer first"):
        EmergencyChannel.attach(run_name)


def test_close_unlinks_the_segment(run_name: str) -> None:
    ch = EmergencyChannel.create(run_name)
    path = f"/dev/shm/{ch.name}"
    assert os.path.exists(path)
    ch.close()
    ch.close()
    assert not os.path.exists(path)


def test_slots_of_dead_participants_are_reclaimed(channel: EmergencyChannel) -> None:
    slots = [channel.register_participant(f"p{i}") for i in range(channel.n_slots)]
    with pytest.raises(ChannelError, match="more n_slots"):
        channel.register_participant("one-too-many")
    struct.pack_into("<q", channel._buf, sig._SLOTS_OFFSET + 3 * sig._SLOT_SIZE + 32, 2**31 + 12345)
    assert channel.register_participant("late") == 3
    channel.release_participant(slots[0])
    assert channel.register_participant("again") == 0


def test_no_torn_read_under_a_busy_reader_process(channel: EmergencyChannel, run_name: str) -> None:
    n = 3000
    results = SPAWN.Queue()
    reader = SPAWN.Process(target=busy_reader, args=(run_name, n, results))
    reader.start()
    try:
        _wait_for_participants(channel, 1)
        for i in range(1, n + 1):
            channel.raise_signal(numbered_signal(i))
        report = results.get(timeout=60)
    finally:
        reader.join(timeout=30)
    assert report["torn"] == 0
    assert report["seen"] >= 2  # the reader really read while the writer was raising
    if platform.machine() in ("x86_64", "AMD64"):
        # Total store order: the seqlock alone must suffice, the checksum never has to catch anything.
        assert report["rejected"] == 0
    final = channel.read(0)
    assert final is not None and is_consistent(final.signal) and final.signal.attributes["i"] == str(n)


def test_critical_broadcast_reaches_and_is_acked_by_every_process(channel: EmergencyChannel, run_name: str) -> None:
    results = SPAWN.Queue()
    workers = [SPAWN.Process(target=acking_participant, args=(run_name, f"worker-{i}", results)) for i in range(3)]
    for w in workers:
        w.start()
    try:
        slots = _wait_for_participants(channel, 3)
        signal = EmergencySignal(version=1, level=EMERGENCY_LEVEL_HALT, reason="watchdog: step hung", origin="tolaria")
        seq = channel.raise_signal(signal)
        acked = channel.wait_for_acks(seq, slots, timeout_s=20)
        reports = [results.get(timeout=20) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=20)
    assert acked == set(slots)
    assert sorted(r["name"] for r in reports) == ["worker-0", "worker-1", "worker-2"]
    assert all(r["seq"] == seq and r["level"] == EMERGENCY_LEVEL_HALT for r in reports)
    assert all(r["reason"] == "watchdog: step hung" for r in reports)
    assert all(w.exitcode == 0 for w in workers)


def test_wait_for_acks_reports_only_who_acked(channel: EmergencyChannel) -> None:
    a, b = channel.register_participant("a"), channel.register_participant("b")
    seq = channel.raise_signal(numbered_signal(1))
    channel.ack(a, seq)
    assert channel.wait_for_acks(seq, [a, b], timeout_s=0.01) == {a}


def test_doorbell_wakes_a_registered_waiter_and_is_removed_on_release(channel: EmergencyChannel, run_name: str) -> None:
    participant = EmergencyChannel.attach(run_name)
    slot = participant.register_participant("waiter")
    bell = f"/dev/shm/{channel.name}.bell{slot}"
    assert os.path.exists(bell)
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(participant.wait_entry(0, timeout_s=10)))
    waiter.start()
    time.sleep(0.05)  # let it block in select on its doorbell
    seq = channel.raise_signal(numbered_signal(9))
    waiter.join(timeout=10)
    received = got[0]
    assert isinstance(received, sig.Received) and received.seq == seq
    participant.release_participant(slot)
    assert not os.path.exists(bell)
    participant.close()


def test_owner_close_removes_doorbells_left_by_crashed_participants(run_name: str) -> None:
    owner = EmergencyChannel.create(run_name)
    crashed = EmergencyChannel.attach(run_name)
    slot = crashed.register_participant("crashes")
    for fd in crashed._bells.pop(slot):  # simulate a crash: the process never removes its FIFO
        os.close(fd)
    bell = f"/dev/shm/{owner.name}.bell{slot}"
    owner.close()
    assert not os.path.exists(bell)
