"""The emergency channel belongs to one run: a sweep of one config on one machine never collides,
a failed start leaves no segment behind, and threads raising at once publish intact records."""

from __future__ import annotations

import os
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from emergency_workers import is_consistent, numbered_signal
from trainer_fixtures import MemoryBus, small_config  # type: ignore[import-not-found]

from esper.tolaria.loop.build import build_trainer
from esper.tolaria.recovery.run_channel import run_channel_key
from esper.tolaria.recovery.signal import EmergencyChannel


@pytest.fixture()
def channel() -> Iterator[EmergencyChannel]:
    ch = EmergencyChannel.create(f"test-{uuid.uuid4().hex[:12]}", n_slots=4)
    yield ch
    ch.close()


def _trainer(run_dir: Path | None) -> Any:
    cfg = small_config(run={"epochs": 1}, emergency={"broadcast": True})
    return build_trainer(cfg, run_dir=run_dir, bus=MemoryBus())


def test_two_runs_of_one_config_in_different_run_dirs_run_side_by_side(tmp_path: Path) -> None:
    first, second = _trainer(tmp_path / "lr-0.1"), _trainer(tmp_path / "lr-0.2")
    try:
        assert first.safety.channel.name != second.safety.channel.name
        assert first.fit().epochs_completed == 1
        assert second.fit().epochs_completed == 1
    finally:
        first.close()
        second.close()


def test_runs_without_a_run_dir_are_keyed_by_their_run_id() -> None:
    first, second = _trainer(None), _trainer(None)
    try:
        assert first.safety.channel.name != second.safety.channel.name
    finally:
        first.close()
        second.close()


def test_a_second_trainer_on_a_live_run_dir_is_refused_with_the_fix(tmp_path: Path) -> None:
    first = _trainer(tmp_path / "run")
    try:
        with pytest.raises(ValueError, match=r"run directory .*run is in use by a live Tolaria process .pid \d+.*"
                                             r"give this run its own --run-dir"):
            _trainer(tmp_path / "run")
    finally:
        first.close()


def test_the_key_is_the_resolved_run_dir_and_the_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_channel_key(Path("a"), "x", 0) == run_channel_key(tmp_path / "a", "y", 0)
    assert run_channel_key(Path("a"), "x", 0) != run_channel_key(Path("a"), "x", 1)
    assert run_channel_key(None, "digits-1234", 2) == "id-digits-1234-r2"


def test_a_create_that_fails_after_making_the_segment_leaves_none(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"test-{uuid.uuid4().hex[:12]}"

    def no_lock_file(self: EmergencyChannel) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(EmergencyChannel, "_open_lock_file", no_lock_file)
    with pytest.raises(OSError, match="Too many open files"):
        EmergencyChannel.create(name)
    assert not os.path.exists(f"/dev/shm/esper-emg-{name}")


def test_threads_raising_at_once_publish_intact_records(channel: EmergencyChannel) -> None:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads between almost any two bytecodes
    try:
        _raise_from_threads(channel)
    finally:
        sys.setswitchinterval(previous)


def _raise_from_threads(channel: EmergencyChannel) -> None:
    threads, per_thread = 4, 150
    start = threading.Barrier(threads + 1)
    torn: list[int] = []
    stop = threading.Event()

    def raiser(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            channel.raise_signal(numbered_signal(t * 1000 + i))

    def reader() -> None:
        after = 0
        while not stop.is_set():
            got = channel.read(after)
            if got is not None:
                after = got.seq
                if not is_consistent(got.signal):
                    torn.append(got.seq)

    workers = [threading.Thread(target=raiser, args=(t,)) for t in range(threads)]
    watcher = threading.Thread(target=reader)
    for w in [*workers, watcher]:
        w.start()
    start.wait()
    for w in workers:
        w.join()
    stop.set()
    watcher.join()
    assert torn == [] and channel.torn_rejected == 0
    assert channel.sequence() == 2 * threads * per_thread, "a raise was lost: two writers took one sequence"
    last = channel.read(0)
    assert last is not None and is_consistent(last.signal)
