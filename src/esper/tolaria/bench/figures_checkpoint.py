"""Bench figures for the durable checkpoint tier: training-thread stall per async checkpoint, WAL latency."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esper.tolaria.bench.registry import figure
from esper.tolaria.checkpoint import CheckpointStore, RecordType, WriteAheadLog
from esper.tolaria.snapshot_cache import SnapshotCache


def _trained_state(width: int, depth: int) -> dict[str, Any]:
    """Model + Adam state after one step, shaped like a trainer snapshot's big sections."""
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, width)).square().mean().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "trainer": {"epoch": 3, "step": 300}, "rng": {"torch": torch.get_rng_state()}}


def _sync_save_ms(state: dict[str, Any], path: Path) -> float:
    start = time.perf_counter_ns()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return (time.perf_counter_ns() - start) / 1e6


@figure("checkpoint_stall_ratio", unit="ratio", goal=0.05)
def checkpoint_stall_ratio(quick: bool) -> list[float]:
    """Training-thread time per async checkpoint divided by a synchronous torch.save to file + fsync
    of the same state, measured back to back in this process.

    The stall is what the trainer does at a boundary: copy the live state into the snapshot
    cache (into an evicted snapshot's buffers, as `snapshots.recycle` does) and hand that
    snapshot to the writer thread. Quick: ~1M-param MLP (4 x 512^2) + Adam state; full: ~16M."""
    width, depth, trials = (512, 4, 5) if quick else (2048, 4, 7)
    live = _trained_state(width, depth)
    ratios = []
    cache = SnapshotCache(capacity=1, recycle=True)
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        store = CheckpointStore(Path(tmp) / "ckpt", keep_last=2)
        # Warm-up: the writer thread starts once per store, and the first snapshots allocate the buffers.
        for warm in range(2):
            store.save_async(cache.take(f"warm{warm}", 0, warm, live)).result(timeout=120)  # type: ignore[arg-type]
        for trial in range(1, trials + 1):
            baseline_ms = _sync_save_ms(live, Path(tmp) / "sync.pt")
            start = time.perf_counter_ns()
            snapshot = cache.take(f"b{trial}", 0, trial, live)
            assert snapshot is not None  # noqa: S101 - far below the cache's cap
            future = store.save_async(snapshot)
            stall_ms = (time.perf_counter_ns() - start) / 1e6
            future.result(timeout=120)  # outside the stall: the next trial starts from an idle writer
            del snapshot, future  # as in training, nothing outside the cache keeps an old snapshot
            ratios.append(stall_ms / baseline_ms)
        store.close()
    return ratios


@figure("wal_append_p99_ms", unit="ms", goal=10.0)
def wal_append_p99_ms(quick: bool) -> list[float]:
    """p99 latency of one durable WAL append (O_DSYNC where available), COMMIT-sized records.
    One value per trial; each trial is 200 (quick) or 1000 appends."""
    per_trial, trials = (200, 3) if quick else (1000, 5)
    payload = b'{"checkpoint": "ckpt-000000000120", "manifest_sha256": "' + b"0" * 64 + b'"}'
    values = []
    with tempfile.TemporaryDirectory(prefix="bench-wal-") as tmp:
        wal = WriteAheadLog(tmp, fsync=True)
        for trial in range(trials):
            samples = []
            for i in range(per_trial):
                start = time.perf_counter_ns()
                wal.append(RecordType.COMMIT, trial * per_trial + i, trial, i, payload)
                samples.append((time.perf_counter_ns() - start) / 1e6)
            values.append(statistics.quantiles(samples, n=100)[98])
        wal.close()
    return values
