"""POSIX shared-memory segments without Python's resource tracker (which would unlink a segment
another process still uses when this one exits), and whether a pid is alive."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory


def pid_alive(pid: int) -> bool:
    """True if a process with `pid` exists (ours or another user's)."""
    if not 0 < pid < 2**31:
        return False  # not a pid any kernel hands out: a zeroed or corrupted slot
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TRACKER_LOCK = threading.Lock()


@contextmanager
def untracked() -> Iterator[None]:
    """Keep SharedMemory from talking to the resource tracker (Python < 3.13 has no track=False)."""
    with _TRACKER_LOCK:
        register, unregister = resource_tracker.register, resource_tracker.unregister
        resource_tracker.register = _ignore  # type: ignore[assignment]
        resource_tracker.unregister = _ignore  # type: ignore[assignment]
        try:
            yield
        finally:
            resource_tracker.register, resource_tracker.unregister = register, unregister


def _ignore(name: str, rtype: str) -> None:
    return None


def open_segment(name: str, create: bool, size: int = 0) -> SharedMemory:
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, create=create, size=size, track=False)  # type: ignore[call-arg,unused-ignore]
    with untracked():
        return SharedMemory(name=name, create=create, size=size)


def unlink_segment(shm: SharedMemory) -> None:
    with untracked():
        try:
            shm.unlink()
        except FileNotFoundError:
            pass  # already reclaimed by a later create(): nothing left to remove
