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
from esper.tolaria.recovery.snapshot_cache import SnapshotCache, copy_behind_rule


def _trained(width: int, depth: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """An MLP + Adam after one step (so the optimizer holds its state)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    _step(model, optimizer, torch.randn(8, width))
    return model, optimizer


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    optimizer.step()


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Shaped like a trainer snapshot's big sections (live tensors, not copies)."""
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
    """Training-thread stall per async checkpoint divided by a synchronous torch.save to file + fsync
    of the same state, measured back to back in this process.

    The stall is measured in a real step loop, as the trainer checkpoints at a boundary: the time
    to take the snapshot (buffers and plain values cloned at once, parameters and Adam state into
    an evicted snapshot's buffers on the cache's copy-behind thread, as `snapshots.recycle` and
    `snapshots.copy_behind` do) and hand it to the writer, plus any wait for that copy before the
    next optimizer step. The next step's forward and backward, which run meanwhile, are not
    counted, nor is the writer's serialization on its own thread. Quick: ~1M-param MLP (4 x 512^2)
    + Adam state, batch 64; full: ~16M."""
    width, depth, trials = (512, 4, 5) if quick else (2048, 4, 7)
    model, optimizer = _trained(width, depth)
    defer = copy_behind_rule(model)  # the trainer's rule
    cache = SnapshotCache(capacity=1, recycle=True)
    batch = torch.randn(64, width)
    ratios = []
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        store = CheckpointStore(Path(tmp) / "ckpt", keep_last=2)
        for trial in range(-2, trials):  # two warm-ups: the threads start, the buffers are allocated
            baseline_ms = _sync_save_ms(_state(model, optimizer), Path(tmp) / "sync.pt")
            start = time.perf_counter_ns()
            snapshot = cache.take(f"b{trial}", 0, trial + 2, _state(model, optimizer), defer=defer)
            assert snapshot is not None  # far below the cache's cap
            future = store.save_async(snapshot)
            stall_ns = time.perf_counter_ns() - start
            optimizer.zero_grad(set_to_none=True)
            model(batch).square().mean().backward()  # the next step runs beside the copy
            start = time.perf_counter_ns()
            cache.settle()  # as the trainer does right before the optimizer writes
            stall_ns += time.perf_counter_ns() - start
            optimizer.step()
            future.result(timeout=120)  # outside the stall: the next trial starts from an idle writer
            del snapshot, future  # as in training, nothing outside the cache keeps an old snapshot
            if trial >= 0:
                ratios.append(stall_ns / 1e6 / baseline_ms)
        store.close()
        cache.close()
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
