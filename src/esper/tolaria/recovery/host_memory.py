"""How much host memory the snapshot cache may take: its default byte cap.

Rule (used when `snapshots.max_mb` is not set): the cap is 2 GiB, raised to two snapshots' bytes
when a snapshot is larger than 1 GiB, as far as host memory allows: up to what the kernel reports
available (`MemAvailable`) plus what the cache itself already holds (it can evict that). So the
cache keeps at least the last two snapshots of any model whose state fits twice in host RAM,
never more than two past 2 GiB, and a state that fits once keeps one.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_CAP_BYTES = 2 * 1024**3
MEMINFO = Path("/proc/meminfo")


def available_host_bytes(meminfo: Path = MEMINFO) -> int:
    """Host memory available to new allocations without swapping: `MemAvailable` from meminfo,
    else the free physical pages `os.sysconf` reports (no meminfo: not Linux)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def cap_for(snapshot_bytes: int, current_cap: int, room: int) -> int:
    """The byte cap that holds two snapshots of `snapshot_bytes` where `room` (bytes available to
    the cache) allows, never below `current_cap` (a cap only grows)."""
    if 2 * snapshot_bytes <= current_cap:
        return current_cap
    return max(current_cap, min(2 * snapshot_bytes, room))
