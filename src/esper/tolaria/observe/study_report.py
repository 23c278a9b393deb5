"""`tolaria report STUDY.json`: a `tolaria study` on one page.

The plot is the study's question: validation metric against cumulative training FLOPs, the three
arms in three colours (host alone, grown, the grown architecture trained statically), one line
per seed, with the grown runs' germinations, fossilizations and culls marked where they happened on
the curve. The static run's final metric, the bar the grown run must reach, is the dashed line
per seed. Tables: each seed's final metric, parameters and FLOPs per arm, what reaching the static
run's final metric cost the grown run, the medians, and the issue's goals.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes

from esper.tolaria.observe.report_html import CSS, escape, html_table
from esper.tolaria.observe.report_plots import new_axes, save_figure

STUDY_FORMAT = "tolaria.study/1"
ARM_STYLE = {"host": ("#7f7f7f", "host alone"), "grown": ("#1f77b4", "grown"),
             "static": ("#d62728", "static final architecture")}
EVENT_MARKERS = {"GERMINATED": ("^", "germinated"), "FOSSILIZED": ("*", "fossilized"), "CULLED": ("x", "culled")}


def load_study(path: Path) -> dict[str, Any]:
    """A study JSON written by `tolaria study`; ValueError naming the problem otherwise."""
    try:
        study = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist; write one with `tolaria study CONFIG --json {path}`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(study, dict) or study.get("format") != STUDY_FORMAT:
        raise ValueError(f"{path} is not a study ({STUDY_FORMAT}); `tolaria report` takes run directories or a "
                         "study JSON written by `tolaria study`")
    return study


def write_study_report(path: Path, out: Path | None = None) -> Path:
    """Write `out/index.html` (default: next to the JSON, `<name>_report/`) for the study at `path`."""
    study = load_study(path)
    out = out or path.with_name(f"{path.stem}_report")
    out.mkdir(parents=True, exist_ok=True)
    png = plot_metric_vs_flops(study, out / "metric_vs_flops.png")
    page = out / "index.html"
    tmp = page.with_suffix(".html.tmp")
    tmp.write_text(_html(study, png), encoding="utf-8")
    tmp.replace(page)
    return page


def plot_metric_vs_flops(study: Mapping[str, Any], path: Path) -> Path:
    metric = str(study.get("metric", "metric"))
    fig, ax = new_axes(f"validation {metric} against training compute", "cumulative training FLOPs",
                       f"validation {metric}", size=(9.0, 5.0))
    labelled: set[str] = set()
    for row in study.get("seeds", []):
        for arm, (color, label) in ARM_STYLE.items():
            curve = row["arms"][arm]["curve"]
            xs = [c["flops"] for c in curve if c["metric"] is not None]
            ys = [c["metric"] for c in curve if c["metric"] is not None]
            ax.plot(xs, ys, color=color, alpha=0.7, linewidth=1.2, label=None if arm in labelled else label)
            labelled.add(arm)
        target = row["arms"]["static"]["final"]
        if target is not None:
            ax.axhline(target, color=ARM_STYLE["static"][0], linestyle="--", linewidth=0.6, alpha=0.4)
        _mark_events(ax, row["arms"]["grown"], labelled)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def _mark_events(ax: Axes, arm: Mapping[str, Any], labelled: set[str]) -> None:
    at = {c["epoch"]: (c["flops"], c["metric"]) for c in arm["curve"] if c["metric"] is not None}
    for event in arm.get("events", []):
        point = at.get(event["epoch"])
        marker = EVENT_MARKERS.get(event["stage"])
        if point is None or marker is None:
            continue
        symbol, label = marker
        ax.scatter([point[0]], [point[1]], marker=symbol, s=60, color="black", zorder=3,
                   label=None if label in labelled else label)
        labelled.add(label)


def _seed_rows(study: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in study.get("seeds", []):
        arms = r["arms"]
        rows.append({"seed": r["seed"], **{f"{arm} final": arms[arm]["final"] for arm in ARM_STYLE},
                     **{f"{arm} params": arms[arm]["params"] for arm in ARM_STYLE},
                     **{f"{arm} FLOPs": _sci(arms[arm]["flops"]) for arm in ARM_STYLE},
                     "grown FLOPs to static final": _sci(r["grown_flops_to_static_final"]),
                     "ratio": r["grown_flops_ratio"], "grown - host": r["grown_minus_host"],
                     "grown - static": r["grown_minus_static"]})
    return rows


def _median_row(study: Mapping[str, Any]) -> dict[str, Any]:
    m = study.get("median", {})
    return {"seed": "median", **{f"{arm} final": m[arm]["final"] for arm in ARM_STYLE},
            **{f"{arm} params": m[arm]["params"] for arm in ARM_STYLE},
            **{f"{arm} FLOPs": _sci(m[arm]["flops"]) for arm in ARM_STYLE},
            "grown FLOPs to static final": _sci(m["grown_flops_to_static_final"]), "ratio": m["grown_flops_ratio"],
            "grown - host": m["grown_minus_host"], "grown - static": m["grown_minus_static"]}


def _goal_rows(study: Mapping[str, Any]) -> list[dict[str, Any]]:
    g = study.get("goals", {})
    t = g.get("thresholds", {})
    return [
        {"goal": f"grown reaches the static final metric with <= {t.get('flops_ratio_at_most')} of its FLOPs "
                 "(median)", "figure": g["flops_ratio"]["median"], "met": g["flops_ratio"]["met"]},
        {"goal": f"grown ends within {t.get('within_points_of_static')} points of static (median, points)",
         "figure": g["within_static"]["median_points"], "met": g["within_static"]["met"]},
        {"goal": f"grown beats the host by >= {t.get('points_over_host')} points on "
                 f"{g['over_host']['needed']} of {g['over_host']['of']} seeds",
         "figure": g["over_host"]["seeds"], "met": g["over_host"]["met"]},
    ]


def _sci(value: Any) -> str:
    return f"{value:.3e}" if isinstance(value, (int, float)) else "never"


def _html(study: Mapping[str, Any], png: Path) -> str:
    columns: Sequence[str] = ["seed", *[f"{a} final" for a in ARM_STYLE], *[f"{a} params" for a in ARM_STYLE],
                              *[f"{a} FLOPs" for a in ARM_STYLE], "grown FLOPs to static final", "ratio",
                              "grown - host", "grown - static"]
    rows = [*_seed_rows(study), _median_row(study)]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>study {escape(study.get('config'))}</title>"
            f"<style>{CSS}</style></head><body><h1>Does growth pay?</h1>"
            f"<p class='muted'>{escape(study.get('config'))}: {len(study.get('seeds', []))} seeds, primary metric "
            f"{escape(study.get('metric'))}; runs under {escape(study.get('run_root'))}</p>"
            f"<figure><img src='{escape(png.name)}' alt='metric against FLOPs'><figcaption>validation metric "
            "against cumulative training FLOPs; dashed: each seed's static final metric</figcaption></figure>"
            f"<h2>Per seed</h2>{html_table(rows, columns, 'no seeds')}"
            f"<h2>Goals</h2>{html_table(_goal_rows(study), ['goal', 'figure', 'met'], 'no goals')}</body></html>")
