"""`summary.json`: what a run did, in one file users and `tolaria report` read."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esper.tolaria.checkpoint.atomic import atomic_write_bytes
from esper.tolaria.loop.boundary import OWN_PHASES

if TYPE_CHECKING:
    from esper.tolaria.loop.trainer import TolariaTrainer

def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def build_summary(t: TolariaTrainer) -> dict[str, Any]:
    last = t.history[-1] if t.history else {}
    timing = t.timer.summary()
    seeds_now = {s.seed_id: s for s in t.kasmina.export_seed_states()}
    manifest = t.kasmina.manifest()
    seeds: dict[str, Any] = {}
    for seed_id, history in t.seed_history.items():
        info: dict[str, Any] = next((s for s in manifest.get("seeds", []) if s.get("seed_id") == seed_id), {})
        seeds[seed_id] = {
            "slot": info.get("slot", ""), "blueprint": info.get("blueprint", ""),
            "stage": history[-1]["stage"] if history else "",
            "stage_history": history, "live": seed_id in seeds_now,
        }
    return {
        "run_id": t.run_id,
        "experiment": t.config.run.name,
        "morphogenesis": t.morphogenesis,
        "epochs_completed": len(t.history),
        "global_step": t.state.global_step,
        "final_val_accuracy": last.get("val_accuracy", float("nan")),
        "final_val_loss": last.get("val_loss", float("nan")),
        "param_count": t.param_count(),
        "final_state_sha256": t.final_state_sha256(),
        "history": t.history,
        "seeds": seeds,
        "boundary_ms": {
            "total": {k: timing.get("total", {}).get(k, 0.0) for k in ("p50", "p99", "max")},
            "phases": {p: timing[p] for p in ("validate", *OWN_PHASES, "snapshot") if p in timing},
            "budget_total_ms": t.config.boundary.total_ms,
        },
        "conservative_mode": t.conservative.summary(),
        "breakers": t.breakers.summary(),
        "telemetry": {**t.telemetry.summary(), **_spool(t.bus)},
        "tamiyo_fallbacks": t.fallbacks,
        "apply_failures": t.apply_failures,
        "rollbacks": t.rollbacks,
        "emergencies": t.safety.emergency_records(),
        "safety": t.safety.summary(),
        "resumed_from": t.resumed_from,
        "world_size": t.world.size,
        "drills": t.faults.summary(),
        "aggregation": {"mode": t.aggregator.config.mode, "nonfinite_steps": t.aggregator.nonfinite_steps},
        "lr": {"current": t.lr.current()},
    }


def _spool(bus: Any) -> dict[str, Any]:
    """What a remote bus could not publish and kept locally (`oona.SpoolingBus`), if it spools."""
    summary = getattr(bus, "summary", None) if hasattr(bus, "spooled") else None
    return dict(summary()) if summary is not None else {}


def write_summary(summary: dict[str, Any], run_dir: Path, *, name: str = "summary.json") -> Path:
    """Write strict JSON (NaN/Inf become null) atomically."""
    path = run_dir / name
    data = json.dumps(_jsonable(summary), indent=2, allow_nan=False).encode()
    atomic_write_bytes(path, data)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)
