"""Atomic writes: old bytes or new bytes, never a mix, never a stray temp file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from esper.tolaria.checkpoint.atomic import atomic_write_bytes


def _fail_halfway(fd: int, data: bytes) -> None:
    os.write(fd, data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_failure_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old bytes")
    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, b"x" * 10_000, write=_fail_halfway)
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_failure_on_first_write_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "new.bin"
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"abc", write=_fail_halfway)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_mid_write_also_cleans_temp(tmp_path: Path) -> None:
    def interrupted(fd: int, data: bytes) -> None:
        os.write(fd, data[:1])
        raise KeyboardInterrupt

    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new", write=interrupted)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
