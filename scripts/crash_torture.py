#!/usr/bin/env python3
"""Crash torture for the checkpoint store: SIGKILL a saving child at random moments, then recover.

A forked child opens a CheckpointStore on the directory and saves small checkpoints in a loop,
reporting each committed txn through a pipe after `save` returns. The parent kills it after a
random delay, reads what was reported, and checks that recovery

- loads a committed checkpoint (once anything was ever committed),
- finds no corrupt file (only torn WAL tails and uncommitted dirs may be cleaned up),
- never loses a reported commit: the recovered txn is at least the newest reported one,
- returns the exact content written for that step.

Usage: scripts/crash_torture.py [--kills 200] [--dir DIR] [--seed 0] [--max-delay-ms 30] [--no-fsync]
Exit status 0 when every cycle passed; 1 with the failing cycles listed otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

from esper.tolaria.checkpoint import CheckpointStore, recover
from esper.tolaria.state.snapshot import Snapshot

BENIGN_EVENTS = ("torn tail", "has no durable COMMIT in the WAL; removed")


def _snapshot(step: int) -> Snapshot:
    state = {"model": {"w": torch.full((16,), float(step))}, "trainer": {"step": step}}
    return Snapshot(snapshot_id=f"s{step}", epoch=step // 10, global_step=step, state=state)


def _child(directory: Path, report_fd: int, fsync: bool) -> None:
    store = CheckpointStore(directory, keep_last=3, fsync=fsync, wal_max_bytes=8192)
    os.write(report_fd, b"ready\n")
    latest = store.latest()
    step = latest.step if latest else 0
    while True:
        step += 1
        info = store.save(_snapshot(step))
        os.write(report_fd, f"{info.txn_id} {info.step}\n".encode())


def _run_child(directory: Path, delay_s: float, fsync: bool, wait_ready: bool) -> list[tuple[int, int]]:
    """Kill a saving child `delay_s` after it started (or, with `wait_ready`, after its store is
    open, so that a loaded machine still kills it among saves, not only while it starts)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the parent's code
        os.close(read_fd)
        code = 0
        try:
            _child(directory, write_fd, fsync)
        except BaseException as exc:  # noqa: BLE001 - report any child failure through the exit status
            print(f"child failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 3
        os._exit(code)
    os.close(write_fd)
    pipe = os.fdopen(read_fd, "rb")
    if wait_ready:
        pipe.readline()  # b"" if the child died first; the exit status says why
    time.sleep(delay_s)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    with pipe:
        lines = pipe.read().decode().split("\n")
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3:
        raise RuntimeError("the saving child failed on its own (see stderr); not a crash-consistency result")
    # a line cut by the kill is not a report: the child died before finishing it
    return [(int(a), int(b)) for a, b in (ln.split() for ln in lines[:-1] if ln and ln != "ready")]


def _check(directory: Path, newest_reported: tuple[int, int] | None) -> str:
    result = recover(directory)
    bad = [e for e in result.events if not any(b in e for b in BENIGN_EVENTS)]
    if bad:
        return f"corruption events: {bad}"
    loaded = result.checkpoint
    if newest_reported is None:
        return ""
    if loaded is None:
        return f"nothing recovered although txn {newest_reported[0]} was reported committed"
    if loaded.txn_id < newest_reported[0]:
        return f"lost commit: recovered txn {loaded.txn_id} < reported {newest_reported[0]}"
    expected = torch.full((16,), float(loaded.step))
    if not torch.equal(loaded.state["model"]["w"], expected) or loaded.state["trainer"]["step"] != loaded.step:
        return f"{loaded.name} content does not match its step"
    return ""


def torture(directory: Path, kills: int, seed: int, max_delay_ms: float, fsync: bool) -> dict[str, object]:
    rng = random.Random(seed)
    newest: tuple[int, int] | None = None
    failures: list[str] = []
    commits = 0
    start = time.monotonic()
    for cycle in range(kills):
        # every fourth kill may land while the store opens (its start-up recovery is crash-tested too)
        reported = _run_child(directory, rng.uniform(0, max_delay_ms) / 1000, fsync, wait_ready=cycle % 4 != 3)
        commits += len(reported)
        if reported:
            newest = max(reported)
        problem = _check(directory, newest)
        if problem:
            failures.append(f"cycle {cycle}: {problem}")
    return {"kills": kills, "commits_reported": commits, "failures": failures,
            "seconds": round(time.monotonic() - start, 2), "newest_txn": newest[0] if newest else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=None, help="checkpoint dir (default: a fresh temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay-ms", type=float, default=30.0)
    parser.add_argument("--no-fsync", action="store_true", help="skip fsync (SIGKILL does not need it)")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error("--kills must be at least 1")
    torch.set_num_threads(1)  # no intra-op thread pool: forking after torch use stays safe
    with tempfile.TemporaryDirectory(prefix="crash-torture-") as tmp:
        directory = args.dir or Path(tmp)
        report = torture(directory, args.kills, args.seed, args.max_delay_ms, not args.no_fsync)
    print(json.dumps(report, indent=2))
    return 1 if report["failures"] or not report["commits_reported"] else 0


if __name__ == "__main__":
    sys.exit(main())
