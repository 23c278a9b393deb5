"""Shared-memory segments outside Python's resource tracker, and the pid check the signal's
cleanup relies on."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import uuid
from multiprocessing import resource_tracker

import pytest

from esper.tolaria.recovery import shm


def test_the_pid_check_only_probes_and_never_signals(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(shm.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    assert shm.pid_alive(4242)
    assert sent == [(4242, 0)]


def test_only_a_live_pid_in_range_is_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    assert shm.pid_alive(os.getpid()) and shm.pid_alive(1)  # pid 1, init, always exists
    assert not any(shm.pid_alive(p) for p in (0, -1, 2**31, 2**31 + 5))
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert not shm.pid_alive(int(done.stdout))  # exited and reaped


def test_a_pid_of_another_user_counts_as_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    def kill(pid: int, sig: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(shm.os, "kill", kill)
    assert shm.pid_alive(12345)


def test_segments_never_reach_the_resource_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(resource_tracker, "register", lambda name, rtype: calls.append(("register", name)))
    monkeypatch.setattr(resource_tracker, "unregister", lambda name, rtype: calls.append(("unregister", name)))
    name = f"tolaria-test-{uuid.uuid4().hex[:12]}"
    segment = shm.open_segment(name, create=True, size=64)
    try:
        segment.buf[:5] = b"hello"
        other = shm.open_segment(name, create=False)
        assert bytes(other.buf[:5]) == b"hello"
        other.close()
    finally:
        shm.unlink_segment(segment)
        shm.unlink_segment(segment)  # already gone: not an error
        segment.close()
    assert calls == []
    with pytest.raises(FileNotFoundError):
        shm.open_segment(name, create=False)


def test_the_tracker_is_restored_after_the_untracked_block_even_on_error() -> None:
    register, unregister = resource_tracker.register, resource_tracker.unregister
    with pytest.raises(RuntimeError), shm.untracked():
        assert resource_tracker.register is not register and resource_tracker.unregister is not unregister
        assert resource_tracker.register("x", "shared_memory") is None  # a no-op while inside
        raise RuntimeError("inside")
    assert resource_tracker.register is register and resource_tracker.unregister is unregister


def test_creating_a_segment_needs_a_size() -> None:
    with pytest.raises(ValueError):
        shm.open_segment(f"tolaria-test-{uuid.uuid4().hex[:12]}", create=True)
