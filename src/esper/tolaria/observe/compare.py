"""`tolaria report RUN RUN [...]`: several runs on one page (growth against `--no-morphogenesis`,
seeds, configs).

The page overlays each run's validation primary metric, losses and parameter count per epoch, marks
every run's germinations, fossilizations and culls on its own curve, and tabulates per run the final
and best metric (with its epoch), parameters, rollbacks, emergencies, training time, every resume
(the epoch, step and checkpoint of each, read as the one-run report reads them:
`report_data.resume_points`), and the config keys that differ between the runs. The plots are
static PNGs (matplotlib, embedded), as in the one-run report: no new dependency for interactivity.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from esper.tolaria.config import flat_keys
from esper.tolaria.observe.report_data import load_summary, read_run_config
from esper.tolaria.observe.report_html import CSS, escape, html_table, resumed_text
from esper.tolaria.observe.report_plots import mark_seed_events, new_axes, save_figure
from esper.tolaria.observe.report_view import RunView, primary_metric


def compare_runs(run_dirs: Sequence[Path], out: Path) -> Path:
    """Write `out/index.html` comparing `run_dirs` (two or more); returns its path."""
    if len(run_dirs) < 2:
        raise ValueError("a comparison needs two or more run directories; `tolaria report RUN` reports one")
    runs = [(_label(Path(d)), RunView.of(load_summary(Path(d)), Path(d))) for d in run_dirs]
    metrics = {primary_metric(run.summary) for _, run in runs}
    metric = metrics.pop() if len(metrics) == 1 else "accuracy"  # different tasks: the packet's common field
    out.mkdir(parents=True, exist_ok=True)
    pngs = {"metric": _overlay(runs, out / "metric.png", f"validation {metric}", lambda r: r.metric_series(metric)),
            "val_loss": _overlay(runs, out / "val_loss.png", "validation loss", lambda r: r.series("val_loss")),
            "train_loss": _overlay(runs, out / "train_loss.png", "training loss", lambda r: r.series("train_loss")),
            "params": _overlay(runs, out / "params.png", "parameters", lambda r: r.series("param_count"))}
    page = out / "index.html"
    tmp = page.with_suffix(".html.tmp")
    tmp.write_text(_html(runs, metric, pngs, [Path(d) for d in run_dirs]), encoding="utf-8")
    tmp.replace(page)  # a reader never sees half a page
    return page


def _label(run_dir: Path) -> str:
    return run_dir.resolve().name


def _overlay(runs: Sequence[tuple[str, RunView]], path: Path, what: str, series: Any) -> Path:
    fig, ax = new_axes(f"{what[0].upper()}{what[1:]} per epoch", "epoch", what)
    for i, (label, run) in enumerate(runs):
        xs, ys = series(run)
        if not xs:
            continue
        (line,) = ax.plot(xs, ys, "-", lw=1.6, label=label)
        mark_seed_events(ax, run.seed_events, dict(zip(xs, ys, strict=True)), line.get_color(), legend=i == 0)
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path)


def _row(label: str, run: RunView, metric: str) -> dict[str, Any]:
    s = run.summary
    best, at = run.best(metric)
    final = (s.get("final_val_metrics") or {}).get(metric, s.get("final_val_accuracy"))
    seconds = sum(float(h.get("epoch_seconds") or 0.0) for h in run.history)
    stages = [seed.get("stage") for seed in (s.get("seeds") or {}).values()]
    return {"run": label, "growth": "on" if s.get("morphogenesis", True) else "off",
            "epochs": s.get("epochs_completed"),
            f"final {metric}": final, f"best {metric}": best, "best epoch": at, "params": s.get("param_count"),
            "seeds (fossilized)": f"{len(stages)} ({stages.count('FOSSILIZED')})",
            "rollbacks": len(run.rollbacks), "emergencies": len(run.emergencies),
            "train time (s)": round(seconds, 1), "resumed": resumed_text(run.resumes)}


def _config_differences(run_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """The config keys whose values differ between runs (from each run's config.json)."""
    flat = [flat_keys(read_run_config(d)) for d in run_dirs]
    keys = sorted(set().union(*flat))
    return [{"key": k, **{_label(d): f.get(k, "-") for d, f in zip(run_dirs, flat, strict=True)}}
            for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


def _html(runs: Sequence[tuple[str, RunView]], metric: str, pngs: Mapping[str, Path], run_dirs: Sequence[Path]) -> str:
    rows = [_row(label, run, metric) for label, run in runs]
    differences = _config_differences(run_dirs)
    images = "".join(f'<figure><img alt="{escape(title)}" src="data:image/png;base64,'
                     f'{base64.b64encode(pngs[key].read_bytes()).decode()}"><figcaption>{escape(title)}</figcaption>'
                     "</figure>"
                     for key, title in (("metric", f"Validation {metric}"), ("val_loss", "Validation loss"),
                                        ("train_loss", "Training loss"), ("params", "Parameters")))
    keys = ["key", *(_label(d) for d in run_dirs)]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Tolaria comparison</title><style>{CSS}"
            f"</style></head><body><h1>Comparison of {len(runs)} runs</h1><h2>Runs</h2>"
            f"{html_table(rows, list(rows[0]), 'no runs')}"
            "<p>Markers on the curves: ▲ germinated, ★ fossilized, × culled (each in its run's colour).</p>"
            f"{images}<h2>Config keys that differ</h2>"
            f"{html_table(differences, keys, 'none: the runs share one config')}</body></html>")
