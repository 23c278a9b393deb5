"""`summary.json`: what a run did, in one file users and `tolaria report` read."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from esper.contracts import ExecutionLayer, SpoolingBusLike
from esper.tolaria.checkpoint.atomic import atomic_write_bytes
from esper.tolaria.config import TolariaConfig
from esper.tolaria.observe.runlog import RunLog
from esper.tolaria.observe.timing import OWN_PHASES, MonotonicTimer
from esper.tolaria.state.position import RunIdentity, TrainerState


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def build_summary(*, identity: RunIdentity, config: TolariaConfig, log: RunLog, position: TrainerState,
                  kasmina: ExecutionLayer, param_count: int, final_state_sha256: str, timer: MonotonicTimer,
                  bus: object, sections: Mapping[str, Any]) -> dict[str, Any]:
    """The summary from the run log and each component's own summary (`sections`), read while the
    components are still open."""
    last = log.last_epoch
    timing = timer.summary()
    spool = dict(bus.summary()) if isinstance(bus, SpoolingBusLike) else {}
    return {
        "run_id": identity.run_id,
        "experiment": identity.name,
        "morphogenesis": config.run.morphogenesis,
        "epochs_completed": len(log.epochs),
        "global_step": position.global_step,
        "final_val_accuracy": last.val_accuracy if last else float("nan"),
        "final_val_loss": last.val_loss if last else float("nan"),
        "final_val_metrics": dict(last.val_metrics) if last else {},
        "param_count": param_count,
        "final_state_sha256": final_state_sha256,
        "history": [asdict(r) for r in log.epochs],
        "seeds": _seeds(log, kasmina),
        "final_manifest": kasmina.manifest(),  # the grown structure: `tolaria study` builds it at birth
        "boundary_ms": {
            "total": {k: timing.get("total", {}).get(k, 0.0) for k in ("p50", "p99", "max")},
            "phases": {p: timing[p] for p in ("validate", *OWN_PHASES, "snapshot") if p in timing},
            "budget_total_ms": config.boundary.total_ms,
        },
        **sections,
        "telemetry": {**sections.get("telemetry", {}), **spool},
        "tamiyo_fallbacks": [asdict(r) for r in log.fallbacks],
        "apply_failures": [asdict(r) for r in log.apply_failures],
        "rollbacks": [asdict(r) for r in log.rollbacks],
        "emergencies": log.emergencies(),
    }


def _seeds(log: RunLog, kasmina: ExecutionLayer) -> dict[str, Any]:
    live = {s.seed_id for s in kasmina.export_seed_states()}
    manifest = kasmina.manifest()
    seeds: dict[str, Any] = {}
    for seed_id, history in log.seed_history.items():
        info: dict[str, Any] = next((s for s in manifest.get("seeds", []) if s.get("seed_id") == seed_id), {})
        seeds[seed_id] = {
            "slot": info.get("slot", ""), "blueprint": info.get("blueprint", ""),
            "stage": history[-1].stage if history else "",
            "stage_history": [asdict(h) for h in history], "live": seed_id in live,
        }
    return seeds


def write_config(config: TolariaConfig, run_dir: Path) -> Path:
    """RUN_DIR/config.json: the effective config, from which `tolaria resume` rebuilds the job."""
    path = run_dir / "config.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(config.model_dump(mode="json"), indent=2).encode())
    return path


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
