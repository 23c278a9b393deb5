"""Bench figures for the emergency path: shared-memory broadcast latency and fast-rollback restore cost.

- `broadcast_ack_p99_ms`: p99 time from `raise_signal` to every ack, with two participant processes
  (spawned, idle between raises as real supervisors are), one value per trial of many raises.
- `fast_rollback_ratio_1m` / `_20m`: restoring an MLP's parameters + Adam state (exp_avg,
  exp_avg_sq, step) through `restore_tensors_` (state_dict walk, pairing, `_foreach_copy_`,
  fingerprint confirm) divided by a raw `copy_` loop over the same tensors, measured interleaved
  in this process.

torch is imported inside the rollback figures so that the spawned broadcast participants, which
import this module, start quickly.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
import uuid
from typing import Any

from esper.leyline import EMERGENCY_LEVEL_HALT, EmergencySignal
from esper.tolaria.bench.registry import figure
from esper.tolaria.recovery.signal import EmergencyChannel

_STOP = "bench-stop"


def _participant(run_name: str, name: str) -> None:
    """Spawned participant: acknowledge every signal until the stop signal (or 30 s of silence)."""
    channel = EmergencyChannel.attach(run_name)
    slot = channel.register_participant(name)
    after = 0
    try:
        while True:
            got = channel.wait_entry(after, timeout_s=30.0)
            if got is None:
                return
            channel.ack(slot, got.seq)
            after = got.seq
            if got.signal.reason == _STOP:
                return
    finally:
        channel.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@figure("broadcast_ack_p99_ms", unit="ms", goal=1.0)
def broadcast_ack_p99_ms(quick: bool) -> list[float]:
    trials, raises, gap_s = (3, 500, 0.002) if quick else (7, 1000, 0.002)
    ctx = mp.get_context("spawn")
    channel = EmergencyChannel.create(f"bench-{uuid.uuid4().hex[:10]}")
    procs = [ctx.Process(target=_participant, args=(channel.run_name, f"p{i}"), daemon=True) for i in range(2)]
    try:
        for p in procs:
            p.start()
        slots = _await_participants(channel, 2)
        signal = EmergencySignal(version=1, level=EMERGENCY_LEVEL_HALT, reason="bench", origin="tolaria")
        _raise_round(channel, signal, slots, 20, gap_s)  # warm up: imports, page faults
        return [_percentile(_raise_round(channel, signal, slots, raises, gap_s), 0.99) for _ in range(trials)]
    finally:
        channel.raise_signal(EmergencySignal(version=1, level=EMERGENCY_LEVEL_HALT, reason=_STOP))
        for p in procs:
            p.join(timeout=10)
        channel.close()


def _await_participants(channel: EmergencyChannel, n: int) -> list[int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        live = channel.live_participants()
        if len(live) >= n:
            return live
        time.sleep(0.01)
    raise RuntimeError(f"bench participants did not register within 60 s (have {channel.live_participants()})")


def _raise_round(
    channel: EmergencyChannel, signal: EmergencySignal, slots: list[int], n: int, gap_s: float
) -> list[float]:
    """Latencies in ms; a raise not acked by all within 1 s counts as 1000 ms."""
    out = []
    for _ in range(n):
        time.sleep(gap_s)  # participants back off to their idle sleep between emergencies
        start = time.perf_counter()
        seq = channel.raise_signal(signal)
        acked = channel.wait_for_acks(seq, slots, timeout_s=1.0)
        out.append((time.perf_counter() - start) * 1000.0 if len(acked) == len(slots) else 1000.0)
    return out


# ---------------------------------------------------------------------- fast rollback


def _mlp_state(n_params: int) -> tuple[dict[str, Any], Any, Any]:
    """An MLP of ~n_params with one Adam step taken; returns (live view, model, optimizer)."""
    import torch
    from torch import nn

    width = 1000 if n_params <= 2_000_000 else 2236
    depth = max(1, round(n_params / (width * width)))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).sum().backward()
    opt.step()
    return _live(model, opt), model, opt


def _live(model: Any, opt: Any) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict()["state"]}


def _rollback_ratio(n_params: int, quick: bool) -> list[float]:
    from esper.tolaria.recovery.snapshot_cache import flatten_tensors, restore_tensors_
    from esper.tolaria.state.snapshot import deep_clone

    live, model, opt = _mlp_state(n_params)
    snap = deep_clone(live)

    def ours() -> None:
        restore_tensors_(_live(model, opt), snap)

    return _ratio_to_raw_copy(flatten_tensors(live), flatten_tensors(snap), ours, n_params, quick)


def _ratio_to_raw_copy(live: dict[str, Any], snap: dict[str, Any], ours: Any, n_params: int,
                       quick: bool) -> list[float]:
    """median(ours) ÷ median(raw `copy_` of snap's tensors into live's), interleaved, per trial."""
    import torch

    pairs = list(zip(live.values(), snap.values(), strict=True))
    # Small models restore in ~0.3 ms, so they need many repetitions for a stable median.
    reps = max(5, min(51, 60_000_000 // n_params))
    reps = reps if not quick else max(5, reps // 3)

    def raw() -> None:
        with torch.no_grad():
            for dst, src in pairs:
                dst.copy_(src)

    out = []
    for _ in range(3 if quick else 7):
        raw_t, ours_t = _interleaved(raw, ours, reps)
        out.append(statistics.median(ours_t) / statistics.median(raw_t))
    return out


def _interleaved(a: Any, b: Any, reps: int) -> tuple[list[float], list[float]]:
    a(), b()  # warm caches and allocator
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(reps):
        for fn, sink in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    return ta, tb


def _trainer_rollback_ratio(features: int, hidden: list[int], quick: bool) -> list[float]:
    """The trainer's whole fast rollback (prepare/commit/confirm across Kasmina, Tolaria and
    Tamiyo: structure check, in-place tensor restore, LR/RNG/data/counters, sampled confirm)
    divided by a raw `copy_` loop over the same model and Adam-state tensors."""
    from esper.tolaria.bench.figures_integration import _trainer
    from esper.tolaria.recovery.snapshot_cache import flatten_tensors

    t = _trainer(None, features, hidden, 3)
    t._train_epoch()
    t.safety.start(resumed=False)
    target = t.safety.snapshots.last_healthy()
    live = {"model": t.model.state_dict(), "optimizer": t.optim.state_dict()["state"]}
    snap = {"model": target.state["model"], "optimizer": target.state["optimizer"]["state"]}

    def ours() -> None:
        outcome = t.safety.coordinator.rollback(target, "fast")
        if not outcome.succeeded:
            raise RuntimeError(f"fast rollback failed: {outcome.reason}")

    n_params = sum(p.numel() for p in t.model.parameters())
    out = _ratio_to_raw_copy(flatten_tensors(live), flatten_tensors(snap), ours, n_params, quick)
    t.close()
    return out


@figure("fast_rollback_ratio_1m", unit="x", goal=1.3)
def fast_rollback_ratio_1m(quick: bool) -> list[float]:
    return _trainer_rollback_ratio(256, [1024, 768], quick)


@figure("fast_rollback_ratio_20m", unit="x", goal=1.3)
def fast_rollback_ratio_20m(quick: bool) -> list[float]:
    return _trainer_rollback_ratio(1024, [4096, 4096], quick)


@figure("restore_tensors_ratio_1m", unit="x", goal=1.3)
def restore_tensors_ratio_1m(quick: bool) -> list[float]:
    """The in-place tensor restore alone (the commit's core), 1M params + Adam, ÷ raw copy_."""
    return _rollback_ratio(1_000_000, quick)
