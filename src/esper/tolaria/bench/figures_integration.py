"""Figures that need the whole trainer: full rollback from disk, and Redis telemetry's cost to training."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from esper.tolaria.bench.registry import figure
from esper.tolaria.checkpoint import recover
from esper.tolaria.checkpoint.layout import MODEL_FILE, STATE_FILE, loads_state


def _trainer(run_dir: Path | None, features: int, hidden: list[int], steps: int, **config: Any) -> Any:
    from esper.tolaria.bench.figures_core import _batches, bench_trainer

    config.setdefault("checkpoint", {"enabled": False})
    return bench_trainer(features, hidden, _batches(features, steps, 64), run_dir, **config)


@figure("full_rollback_ratio", unit="x", goal=1.3)
def full_rollback_ratio(quick: bool) -> list[float]:
    """A MAJOR's full rollback (WAL replay, checksum verification, load, prepare/commit/confirm of a
    ~1M-param MLP with Adam state) ÷ raw `torch.load` of the same two files + `load_state_dict`
    of model and optimizer. Alternating, median of each."""
    ratios = []
    with tempfile.TemporaryDirectory(prefix="bench-full-") as tmp:
        t = _trainer(Path(tmp), 256, [1024, 768], 6, checkpoint={"enabled": True})
        t._train_epoch()
        assert t.checkpoints.store is not None  # checkpoints are enabled above
        info = t.checkpoints.store.save(t.registry.snapshot("bench", t.state.epoch, t.state.global_step))
        ours, raw = [], []
        for _ in range(9 if quick else 15):
            ours.append(_full_rollback_s(t))
            raw.append(_raw_load_s(t, info.path))
        ratios.append(statistics.median(ours) / statistics.median(raw))
        t.close()
    return ratios


def _full_rollback_s(t: Any) -> float:
    started = time.perf_counter()
    loaded = recover(t.checkpoints.directory, clean=False).checkpoint
    if loaded is None:
        raise RuntimeError("the checkpoint written for the figure does not recover")
    outcome = t.safety.coordinator.rollback(loaded.snapshot(), "full")
    if not outcome.succeeded:
        raise RuntimeError(f"full rollback failed: {outcome.reason}")
    return time.perf_counter() - started


def _raw_load_s(t: Any, path: Path) -> float:
    started = time.perf_counter()
    state = loads_state((path / STATE_FILE).read_bytes())
    model = loads_state((path / MODEL_FILE).read_bytes())
    t.model.load_state_dict(model)
    t.optim.load_state_dict(state["optimizer"])
    return time.perf_counter() - started


@figure("redis_publish_overhead", unit="fraction", goal=0.01, needs="redis")
def redis_publish_overhead(quick: bool) -> list[float]:
    """Steps/s lost with telemetry published to Redis vs not published, in
    alternating windows of one run on a ~1M-param MLP: 1 − rate_on / rate_off (medians). Step
    metrics every 10 steps (5x the default rate) plus every epoch packet; the publisher pipelines."""
    from esper.oona import RedisBus
    from esper.tolaria.bench.figures_core import _NullBus, require_no_incidents

    url = os.environ["TOLARIA_BENCH_OONA"]
    secret = os.environ.get("ESPER_LEYLINE_SECRET", "bench-secret").encode()
    t = _trainer(None, 256, [1024, 768], 60 if quick else 120, telemetry={"jsonl": False, "step_interval": 10})
    redis_bus, null_bus = RedisBus(url, secret=secret), _NullBus()
    on: list[float] = []
    off: list[float] = []
    t._train_epoch()  # warm-up
    for r in range(7 if quick else 15):
        order = ((redis_bus, on), (null_bus, off))
        for bus, rates in order if r % 2 == 0 else order[::-1]:  # ABBA: no position bias
            t.telemetry.bus = bus
            started = time.perf_counter()
            t._train_epoch()
            rates.append(len(t.batches) / (time.perf_counter() - started))
            t.telemetry.flush(10.0)
    published = t.telemetry.published
    require_no_incidents(t, "redis_publish_overhead")
    t.close()
    redis_bus.close()
    if published == 0:
        raise RuntimeError("nothing reached Redis: is the URL right?")
    return [1.0 - statistics.median(on) / statistics.median(off)]
