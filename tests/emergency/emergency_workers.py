"""Process targets for the emergency-channel tests (spawned: importable, no torch)."""

from __future__ import annotations

import time
from multiprocessing.queues import Queue
from typing import Any

from esper.leyline import EmergencySignal
from esper.tolaria.recovery.signal import EmergencyChannel


def numbered_signal(i: int) -> EmergencySignal:
    """A signal whose fields all derive from `i`, so a mixed (torn) copy is detectable."""
    return EmergencySignal(
        version=1,
        level=i % 4 + 1,
        reason=f"{i}:" + "x" * (i % 300),
        origin=f"w{i % 10}",
        monotonic_time_ms=i,
        run_id=f"run-{i}",
        attributes={"i": str(i)},
    )


def is_consistent(signal: EmergencySignal) -> bool:
    i = int(signal.attributes["i"])
    return signal == numbered_signal(i)


def busy_reader(run_name: str, final_i: int, results: Queue[Any]) -> None:
    """Read as fast as possible until signal `final_i` is seen; report reads and torn copies."""
    channel = EmergencyChannel.attach(run_name)
    channel.register_participant("reader")
    seen = torn = polls = 0
    after = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        polls += 1
        got = channel.read(after)
        if got is None:
            continue
        after = got.seq
        seen += 1
        if not is_consistent(got.signal):
            torn += 1
        if int(got.signal.attributes["i"]) == final_i:
            break
    results.put({"seen": seen, "torn": torn, "polls": polls, "rejected": channel.torn_rejected})
    channel.close()


def acking_participant(run_name: str, name: str, results: Queue[Any]) -> None:
    """Attach, register, wait for one signal, acknowledge it and report what arrived."""
    channel = EmergencyChannel.attach(run_name)
    slot = channel.register_participant(name)
    got = channel.wait_entry(0, timeout_s=20)
    if got is not None:
        channel.ack(slot, got.seq)
        results.put({"name": name, "slot": slot, "seq": got.seq, "level": got.signal.level,
                     "reason": got.signal.reason})
    else:
        results.put({"name": name, "slot": slot, "seq": 0})
    channel.close()
