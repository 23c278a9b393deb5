"""Atomic file writes: a reader sees the old bytes or the new bytes, never a mix.

Protocol: temp file in the same directory -> write -> fsync -> `os.replace` onto the target ->
fsync the directory (so the rename itself survives power loss). On any error the temp file is
removed and the target is untouched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

# `write(fd, data)` must write all of `data` to `fd` or raise; tests pass one that fails halfway.
WriteFn = Callable[[int, bytes], None]
# `crash_point(label)` is called before each durable step ("write", "fsync", "rename", "fsync-dir");
# crash tests raise from it or copy the directory there. None costs nothing.
CrashPoint = Callable[[str], None]

TEMP_SUFFIX = ".tmp"


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` to `fd` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory so entries created, renamed or removed in it are durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A unique temp name beside `path`: hidden, and ending in TEMP_SUFFIX so cleaners can find it."""
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}{TEMP_SUFFIX}")


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, *, fsync: bool = True, write: WriteFn | None = None,
    crash_point: CrashPoint | None = None,
) -> None:
    """Replace `path` with `data` atomically.

    With `fsync=False` the replace is still atomic for other processes, but not durable across a
    power loss (tests and throw-away files only). Raises the OSError that stopped the write; the
    previous content of `path`, if any, is intact and no temp file is left behind.
    """
    target = Path(path)
    tmp = temp_path_for(target)
    crash = crash_point or _no_crash
    crash("write")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            (write or write_all)(fd, data)
            if fsync:
                crash("fsync")
                os.fsync(fd)
        finally:
            os.close(fd)
        crash("rename")
        os.replace(tmp, target)
    except BaseException:
        _remove_quietly(tmp)
        raise
    if fsync:
        crash("fsync-dir")
        fsync_dir(target.parent)


def _no_crash(label: str) -> None:
    return


def _remove_quietly(path: Path) -> None:
    # The write already failed; a missing temp file is the expected case, not a second error.
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
