"""`tolaria study CONFIG --seeds 0-4 --json OUT`: does growth pay, per unit of compute?

For each seed, on the same data split and epoch budget, three arms of one config:

- `host`: the host alone (`run.morphogenesis = false`);
- `grown`: the run as configured, growing;
- `static`: the grown run's final architecture trained statically from step 0 (its
  `final_manifest` built into the host at birth, `model.initial_manifest`, seeds at full
  strength and trained as host parameters; no growth).

Each arm is an ordinary run (`job.run_job`) in `RUN_ROOT/seed<N>/<arm>`, so every run directory
can be reported, compared or resumed like any other. Per seed and arm the study keeps the final
and best primary metric, the parameters, the training FLOPs (`summary.json`'s `flops.total`) and
the curve of metric against cumulative FLOPs with the seed events; it then asks what growth costs:
the FLOPs the grown run spent until its validation metric first reached the static run's final
one (null if it never did) and their ratio to the static run's total, and the same for the
validation loss (`..._loss`, the issue's measure for a language model); a seed whose grown run
never grew (`grew` false) has three copies of the host and is reported as such. Medians over
seeds follow ("never reached" counts as infinitely expensive, so the median is null when most
seeds never reached it), and the issue's goals are checked against them (`goals`).
"""

from __future__ import annotations

import copy
import json
import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from esper.tolaria.checkpoint.atomic import atomic_write_bytes
from esper.tolaria.config import TolariaConfig, load_config, merge_overrides
from esper.tolaria.imports import on_sys_path, user_import_roots
from esper.tolaria.job import run_job
from esper.tolaria.observe.study_report import STUDY_FORMAT

ARMS = ("host", "grown", "static")
EVENT_STAGES = ("GERMINATED", "FOSSILIZED", "CULLED")
GOALS = {"flops_ratio_at_most": 0.70, "within_points_of_static": 0.5, "points_over_host": 3.0,
         "seeds_over_host_fraction": 0.8}
"""The issue's bar: reach the static run's final metric with ≤ 70 % of its FLOPs (median), end within
0.5 points of it, and beat the host by ≥ 3 points on 4 of 5 seeds (points: the metric × 100)."""


def parse_seeds(text: str) -> list[int]:
    """`0-4`, `0,2,5`, `3` or a mix (`0-2,7`) -> the seeds in order, each once."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
            raise ValueError(f"--seeds {text!r}: expected seeds like 0-4, 0,2,5 or 3 (a range low-high, low <= high)")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        seeds += [s for s in range(low, high + 1) if s not in seeds]
    return seeds


def run_study(config_path: Path, seeds: Sequence[int], *, run_root: Path, out: Path | None = None,
              epochs: int | None = None, overrides: Mapping[str, Any] | None = None,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the three arms for every seed and return (and write to `out`) the study. `overrides`
    (nested, as `--set` gives them) apply to every arm; each arm's own keys (seed, growth, the
    initial manifest) win over them."""
    if not seeds:
        raise ValueError("a study needs at least one seed: --seeds 0-4")
    rows: list[dict[str, Any]] = []
    study: dict[str, Any] = {}
    for seed in seeds:
        arms, task = _run_seed(config_path, seed, run_root / f"seed{seed}", epochs, overrides or {}, say)
        higher = bool(task.get("higher_is_better", True))
        rows.append(seed_result(seed, arms, higher=higher))
        study = {"format": STUDY_FORMAT, "config": str(config_path), "run_root": str(run_root),
                 "metric": task.get("primary_metric", "accuracy"), "higher_is_better": higher,
                 "seeds_requested": list(seeds), "seeds": rows, "median": medians(rows), "goals": goals(rows)}
        if out is not None:  # after every seed: an interrupted study keeps the seeds it finished
            _write_json(out, study)
    return study


def _run_seed(config_path: Path, seed: int, base: Path, epochs: int | None, overrides: Mapping[str, Any],
              say: Callable[[str], None]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The three arms of one seed, in order (the static arm is built from the grown run's manifest)."""
    arms: dict[str, dict[str, Any]] = {}
    task: dict[str, Any] = {}
    manifest = base / "grown" / "final_manifest.json"
    for arm in ARMS:
        say(f"study: seed {seed}, {arm} -> {base / arm}")
        arm_overrides = merge_overrides(copy.deepcopy(dict(overrides)), _arm_overrides(arm, seed, epochs, manifest))
        summary = _run_arm(config_path, base / arm, arm_overrides)
        if arm == "grown":
            _write_json(manifest, summary["final_manifest"])
        task = summary.get("task") or task
        arms[arm] = arm_result(summary, base / arm, _metric(summary))
    return arms, task


def _arm_overrides(arm: str, seed: int, epochs: int | None, manifest: Path) -> dict[str, Any]:
    overrides: dict[str, Any] = {"run": {"seed": seed}}
    if epochs is not None:
        overrides["run"]["epochs"] = epochs
    if arm != "grown":
        overrides["run"]["morphogenesis"] = False
    if arm == "static":
        overrides["model"] = {"initial_manifest": str(manifest.resolve())}
    return overrides


def _run_arm(config_path: Path, run_dir: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    config = load_config(config_path, overrides)
    _find_user_code(config, config_path)
    with on_sys_path(user_import_roots(config_path)):
        return run_job(config, run_dir, progress=False, report=False, overwrite=True)


def _find_user_code(config: TolariaConfig, config_path: Path) -> None:
    """As `tolaria run` does: code the config names lives next to it (kept in config.json for a resume)."""
    if (config.model.factory or config.data.factory or ":" in config.task) and not config.run.import_paths:
        config.run.import_paths = [str(config_path.resolve().parent)]


def _metric(summary: Mapping[str, Any]) -> str:
    return str((summary.get("task") or {}).get("primary_metric", "accuracy"))


def arm_result(summary: Mapping[str, Any], run_dir: Path, metric: str) -> dict[str, Any]:
    """One arm's figures and its metric-against-FLOPs curve, from its summary."""
    history = list(summary.get("history", []))
    curve = [{"epoch": h["epoch"], "flops": h.get("flops", 0.0), "metric": _value(h, metric),
              "loss": _value(h, "val_loss", direct=True), "params": h.get("param_count")} for h in history]
    values = [c["metric"] for c in curve if c["metric"] is not None]
    higher = bool((summary.get("task") or {}).get("higher_is_better", True))
    best = (max if higher else min)(values) if values else None
    flops = summary.get("flops") or {}
    return {
        "run_dir": str(run_dir),
        "final": _value(summary.get("final_val_metrics") or {}, metric, direct=True),
        "final_loss": _value(summary, "final_val_loss", direct=True),
        "best": best, "best_epoch": next((c["epoch"] for c in curve if c["metric"] == best), None),
        "params": summary.get("param_count"), "params_at_first_epoch": curve[0]["params"] if curve else None,
        "flops": flops.get("total"), "flops_per_step": flops.get("per_step"),
        "epochs": len(history), "curve": curve, "events": _events(summary),
    }


def _value(row: Mapping[str, Any], metric: str, *, direct: bool = False) -> float | None:
    value = row.get(metric) if direct else (row.get("val_metrics") or {}).get(metric, row.get("val_accuracy"))
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _events(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    found = [{"epoch": change["epoch"], "stage": _stage(change["stage"]), "seed": seed_id}
             for seed_id, seed in (summary.get("seeds") or {}).items() for change in seed.get("stage_history", [])
             if _stage(change["stage"]) in EVENT_STAGES]
    return sorted(found, key=lambda e: (e["epoch"], e["seed"]))


def _stage(name: Any) -> str:
    return str(name).removeprefix("SEED_STAGE_")


def seed_result(seed: int, arms: Mapping[str, dict[str, Any]], *, higher: bool) -> dict[str, Any]:
    """One seed's arms and what growth cost against the static run."""
    grown, static, host = arms["grown"], arms["static"], arms["host"]
    reached = _flops_to_reach(grown["curve"], "metric", static["final"], higher)
    reached_loss = _flops_to_reach(grown["curve"], "loss", static["final_loss"], False)
    grew = bool(grown["events"]) or grown["params"] != host["params"]  # else all three arms are the host
    return {"seed": seed, "arms": dict(arms), "grew": grew, "grown_flops_to_static_final": reached,
            "grown_flops_ratio": _ratio(reached, static["flops"]),
            "grown_flops_to_static_final_loss": reached_loss,
            "grown_flops_ratio_loss": _ratio(reached_loss, static["flops"]),
            "grown_minus_host": _difference(grown["final"], host["final"], higher),
            "grown_minus_static": _difference(grown["final"], static["final"], higher)}


def _flops_to_reach(curve: Sequence[Mapping[str, Any]], key: str, target: float | None,
                    higher: bool) -> float | None:
    """The cumulative FLOPs of the first epoch whose `key` is at least as good as `target`."""
    if target is None:
        return None
    return next((c["flops"] for c in curve if c.get(key) is not None
                 and (c[key] >= target if higher else c[key] <= target)), None)


def _ratio(part: float | None, whole: float | None) -> float | None:
    return part / whole if part is not None and whole else None


def _difference(a: float | None, b: float | None, higher: bool) -> float | None:
    """How much better `a` is than `b` (positive: better), in the metric's units."""
    if a is None or b is None:
        return None
    return a - b if higher else b - a


def _median(values: Sequence[float | None], *, missing_is_infinite: bool = False) -> float | None:
    if missing_is_infinite:
        ranked = sorted(math.inf if v is None else v for v in values)
        middle = statistics.median(ranked) if ranked else math.inf
        return None if math.isinf(middle) or math.isnan(middle) else middle
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def medians(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Each arm's figures and the comparisons, as medians over the seeds."""
    out: dict[str, Any] = {arm: {key: _median([r["arms"][arm][key] for r in rows])
                                 for key in ("final", "best", "params", "flops")} for arm in ARMS}
    for key in ("grown_flops_to_static_final", "grown_flops_ratio", "grown_flops_to_static_final_loss",
                "grown_flops_ratio_loss"):
        out[key] = _median([r[key] for r in rows], missing_is_infinite=True)
    out["reached"] = sum(r["grown_flops_to_static_final"] is not None for r in rows)
    out["grew"] = sum(r["grew"] for r in rows)
    for key in ("grown_minus_host", "grown_minus_static"):
        out[key] = _median([r[key] for r in rows])
    return out


def goals(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The issue's bar, checked: each goal's figure and whether it is met (None: not measurable)."""
    ratio = _median([r["grown_flops_ratio"] for r in rows], missing_is_infinite=True)
    gaps = [r["grown_minus_static"] for r in rows]
    gap = _median(gaps)
    over = [r["grown_minus_host"] for r in rows]
    beating = sum(d is not None and d * 100 >= GOALS["points_over_host"] for d in over)
    needed = math.ceil(GOALS["seeds_over_host_fraction"] * len(rows))
    return {
        "thresholds": dict(GOALS),
        "flops_ratio": {"median": ratio, "met": ratio is not None and ratio <= GOALS["flops_ratio_at_most"]},
        "within_static": {"median_points": None if gap is None else gap * 100,
                          "met": gap is not None and gap * 100 >= -GOALS["within_points_of_static"]},
        "over_host": {"seeds": beating, "of": len(rows), "needed": needed, "met": beating >= needed},
    }


def format_table(study: Mapping[str, Any]) -> str:
    """The study as a plain-text table: one line per seed, then the medians and the goals."""
    metric = study["metric"]
    lines = [f"{'seed':>5} | {'host':>7} | {'grown':>7} | {'static':>7} | {'params g/s':>13} | "
             f"{'FLOPs host':>10} {'grown':>10} {'static':>10} | {'to reach':>10} | ratio   ({metric}, final)"]

    def row(label: str, figures: Mapping[str, Any], reach: Any, ratio: Any) -> str:
        a = figures["host"] if "host" in figures else figures["arms"]["host"]
        g = figures["grown"] if "grown" in figures else figures["arms"]["grown"]
        s = figures["static"] if "static" in figures else figures["arms"]["static"]
        return (f"{label:>5} | {_fmt(a['final'])} | {_fmt(g['final'])} | {_fmt(s['final'])} | "
                f"{_int(g['params']):>6}/{_int(s['params']):<6} | {_sci(a['flops'])} {_sci(g['flops'])} "
                f"{_sci(s['flops'])} | {_sci(reach)} | {_fmt(ratio, 2)}")

    for r in study["seeds"]:
        lines.append(row(str(r["seed"]), r, r["grown_flops_to_static_final"], r["grown_flops_ratio"]))
    m = study["median"]
    lines.append(row("med", m, m["grown_flops_to_static_final"], m["grown_flops_ratio"]))
    idle = [str(r["seed"]) for r in study["seeds"] if not r["grew"]]
    if idle:
        lines.append(f"seeds {', '.join(idle)} did not grow: their three arms are the same host")
    g = study["goals"]
    lines.append(f"goals: FLOPs ratio {_fmt(g['flops_ratio']['median'], 2).strip()} "
                 f"(<= {g['thresholds']['flops_ratio_at_most']}: {g['flops_ratio']['met']}); grown - static "
                 f"{_fmt(g['within_static']['median_points'], 2).strip()} points (>= -"
                 f"{g['thresholds']['within_points_of_static']}: {g['within_static']['met']}); over host by >= "
                 f"{g['thresholds']['points_over_host']} points on {g['over_host']['seeds']}/{g['over_host']['of']} "
                 f"seeds (needs {g['over_host']['needed']}: {g['over_host']['met']})")
    return "\n".join(lines)


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:7.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>7}"


def _sci(value: Any) -> str:
    return f"{value:10.3e}" if isinstance(value, (int, float)) else f"{'never':>10}"


def _int(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, (int, float)) else "-"


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(data, indent=2, allow_nan=False).encode())
