"""The one-run report's plots: one static PNG per plot in `PLOTS` (matplotlib, no display), drawn
from a `RunView`. A plot without data says so in the image, so every PNG exists and is non-empty.
Rollbacks, emergencies, conservative-mode epochs and resumes are marked on the epoch plots; seed
events on the loss and metric curves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from esper.leyline import (
    SEED_STAGE_CULLED,
    SEED_STAGE_EMBARGOED,
    SEED_STAGE_FOSSILIZED,
    SEED_STAGE_TERMINATED,
    SeedLifecycleStage,
)
from esper.tolaria.observe.report_data import ResumePoint, SeedEvent, dicts, num
from esper.tolaria.observe.report_view import RunView, conservative_spans, epochs_of, primary_metric, stage_name

DPI = 110
_ROLLBACK_COLOR = "#d62728"
_EMERGENCY_COLOR = "#ff7f0e"
_CONSERVATIVE_COLOR = "#ffdd57"
_RESUME_COLOR = "#1f77b4"
_BEST_COLOR = "#2ca02c"
SEED_MARKERS = {"GERMINATED": ("^", "germinated"), "FOSSILIZED": ("*", "fossilized"), "CULLED": ("x", "culled")}


def new_axes(title: str, xlabel: str, ylabel: str, *, size: tuple[float, float] = (8.0, 4.2)) -> tuple[Figure, Axes]:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded in this run", ha="center", va="center", transform=ax.transAxes,
            fontsize=12, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


def _mark_events(ax: Axes, run: RunView) -> None:
    """Rollbacks as red dashed lines, emergencies as orange triangles on top, conservative epochs shaded."""
    for i, (first, last) in enumerate(conservative_spans(run.conservative_epochs)):
        ax.axvspan(first - 0.5, last + 0.5, color=_CONSERVATIVE_COLOR, alpha=0.35, lw=0, zorder=0,
                   label="conservative mode" if i == 0 else None)
    for i, epoch in enumerate(epochs_of(run.rollbacks)):
        ax.axvline(epoch, color=_ROLLBACK_COLOR, ls="--", lw=1.3, label="rollback" if i == 0 else None)
    emergencies = epochs_of(run.emergencies)
    if emergencies:  # markers along the top edge stay visible where a rollback line sits at the same epoch
        ax.plot(emergencies, [0.96] * len(emergencies), "v", ms=9, color=_EMERGENCY_COLOR, mec="black", mew=0.6,
                transform=ax.get_xaxis_transform(), clip_on=False, label="emergency", ls="none")
    _mark_resumes(ax, [p.epoch - 0.5 for p in run.resumes], run.resumes)


def _mark_resumes(ax: Axes, xs: Sequence[float], resumes: Sequence[ResumePoint]) -> None:
    """A vertical line where each resumed process began, with the checkpoint it started from."""
    for i, (x, point) in enumerate(zip(xs, resumes, strict=True)):
        ax.axvline(x, color=_RESUME_COLOR, ls=":", lw=1.6, label="resumed" if i == 0 else None)
        ax.text(x, 0.02, f" resumed from {point.checkpoint}", rotation=90, va="bottom", ha="right", fontsize=7,
                color=_RESUME_COLOR, transform=ax.get_xaxis_transform())


def mark_seed_events(ax: Axes, events: Sequence[SeedEvent], at: Mapping[float, float], color: Any, *,
                     legend: bool = True) -> None:
    """Each germination, fossilization and cull as a marker on a curve (`at`: epoch -> value), at its
    epoch; `legend` labels the first marker of each kind."""
    labelled: set[str] = set()
    for event in events:
        epoch = float(event.epoch)
        if event.stage not in SEED_MARKERS or epoch not in at:
            continue
        symbol, name = SEED_MARKERS[event.stage]
        label = name if legend and name not in labelled else None
        labelled.add(name)
        ax.plot([epoch], [at[epoch]], symbol, ms=10, color=color, mec="black", mew=0.7, ls="none", label=label,
                zorder=4)


def save_figure(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def plot_loss(run: RunView, path: Path) -> Path:
    fig, ax = new_axes("Loss per epoch", "epoch", "loss")
    plotted = False
    for key, label, style in (("train_loss", "train loss", "-o"), ("val_loss", "validation loss", "-s")):
        xs, ys = run.series(key)
        if xs:
            (line,) = ax.plot(xs, ys, style, ms=3, label=label)
            if key == "val_loss":
                mark_seed_events(ax, run.seed_events, dict(zip(xs, ys, strict=True)), line.get_color())
            plotted = True
    if not plotted:
        _no_data(ax, "losses")
        return save_figure(fig, path)
    _mark_events(ax, run)
    ax.legend(loc="best")
    return save_figure(fig, path)


def plot_accuracy(run: RunView, path: Path) -> Path:
    """The task's primary metric per epoch (accuracy for classifiers, R², token accuracy, ...)."""
    name = primary_metric(run.summary)
    fig, ax = new_axes(f"Validation {name} per epoch", "epoch", name)
    xs, ys = run.metric_series(name)
    if not xs:
        _no_data(ax, f"validation {name}")
        return save_figure(fig, path)
    ax.plot(xs, ys, "-o", ms=3, color="#2ca02c", label=f"validation {name}")
    mark_seed_events(ax, run.seed_events, dict(zip(xs, ys, strict=True)), "#2ca02c")
    best, at = run.best(name)
    ax.plot([at], [best], "o", ms=14, mfc="none", mec=_BEST_COLOR, mew=2, ls="none",
            label=f"best {best:.4g} at epoch {at:g}")
    _mark_events(ax, run)
    ax.legend(loc="best")
    return save_figure(fig, path)


def plot_lr(run: RunView, path: Path) -> Path:
    fig, ax = new_axes("Learning rate per parameter group", "epoch", "learning rate")
    groups: dict[str, tuple[list[float], list[float]]] = {}
    for rec in run.history:
        lrs, epoch = rec.get("lr"), num(rec.get("epoch"))
        if not isinstance(lrs, dict) or not math.isfinite(epoch):
            continue
        for group, value in lrs.items():
            if math.isfinite(num(value)):
                xs, ys = groups.setdefault(str(group), ([], []))
                xs.append(epoch)
                ys.append(num(value))
    if not groups:
        _no_data(ax, "learning rates")
        return save_figure(fig, path)
    for group, (xs, ys) in sorted(groups.items()):
        ax.plot(xs, ys, "-", marker=".", label=group)
    if all(y > 0 for _, ys in groups.values() for y in ys):
        ax.set_yscale("log")  # seed warm-ups start orders of magnitude below the host LR
    _mark_events(ax, run)
    ax.legend(loc="best", fontsize="small", ncol=max(1, len(groups) // 8))
    return save_figure(fig, path)


def plot_params(run: RunView, path: Path) -> Path:
    fig, ax = new_axes("Parameter count per epoch", "epoch", "parameters")
    xs, ys = run.series("param_count")
    if not xs:
        _no_data(ax, "parameter counts")
        return save_figure(fig, path)
    ax.step(xs, ys, where="post", color="#9467bd", label="parameters")
    ax.plot(xs, ys, "o", ms=3, color="#9467bd")
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    _mark_events(ax, run)
    ax.legend(loc="best")
    return save_figure(fig, path)


def plot_epoch_time(run: RunView, path: Path) -> Path:
    fig, ax = new_axes("Wall-clock per epoch", "epoch", "seconds")
    xs, ys = run.series("epoch_seconds")
    if not xs:
        _no_data(ax, "epoch times")
        return save_figure(fig, path)
    ax.bar(xs, ys, width=0.8, color="#8c8c8c", label=f"epoch (total {math.fsum(ys):.1f} s)")
    _mark_events(ax, run)
    ax.legend(loc="best")
    return save_figure(fig, path)


def plot_step_loss(run: RunView, path: Path) -> Path:
    fig, ax = new_axes("Training loss per step", "global step", "loss")
    steps, losses = run.step_losses
    if not steps:
        _no_data(ax, "step losses (set telemetry.step_log = true for every step)")
        return save_figure(fig, path)
    ax.plot(steps, losses, "-", lw=0.8, color="#1f77b4", label="step loss")
    if all(v > 0 for v in losses) and max(losses) > 20 * min(losses):
        ax.set_yscale("log")  # a spike or an early plunge would flatten the rest
    for i, step in enumerate(num(r.get("step")) for r in run.rollbacks):
        if math.isfinite(step):
            ax.axvline(step, color=_ROLLBACK_COLOR, ls="--", lw=1.3, label="rollback" if i == 0 else None)
    _mark_resumes(ax, [float(p.step) for p in run.resumes], run.resumes)
    ax.legend(loc="best")
    return save_figure(fig, path)


def _stage_colors() -> dict[str, Any]:
    """One color per Leyline lifecycle stage, in lifecycle order."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]  # by stage number: fossilized lands on gray, which reads as "frozen"
    return {stage_name(name): cmap(number % 10) for name, number in SeedLifecycleStage.items()}


def _seed_segments(seed: Mapping[str, Any], end_epoch: float) -> list[tuple[float, float, str]]:
    """(start, width, stage) per stage the seed went through; the last one lasts until `end_epoch`,
    except for a seed no longer live whose removal was not recorded: its bar stops one epoch after
    its last recorded change (the plot marks that end)."""
    steps = sorted(((num(h.get("epoch")), stage_name(h.get("stage", ""))) for h in dicts(seed.get("stage_history"))
                    if math.isfinite(num(h.get("epoch")))), key=lambda s: s[0])
    out: list[tuple[float, float, str]] = []
    for i, (start, stage) in enumerate(steps):
        if stage in _GONE_STAGES:  # a culled seed no longer exists: a short final mark, not a bar to the end
            last_stop = start + 0.3
        elif _removed_unrecorded(seed, stage):
            last_stop = start + 1
        else:
            last_stop = max(end_epoch, start + 1)
        stop = steps[i + 1][0] if i + 1 < len(steps) else last_stop
        out.append((start, max(stop - start, 0.2), stage))
    return out


_FINAL_STAGES = frozenset(stage_name(SeedLifecycleStage.Name(n)) for n in (
    SEED_STAGE_FOSSILIZED, SEED_STAGE_CULLED, SEED_STAGE_TERMINATED, SEED_STAGE_EMBARGOED))


_GONE_STAGES = frozenset(stage_name(SeedLifecycleStage.Name(n)) for n in (SEED_STAGE_CULLED, SEED_STAGE_TERMINATED))


def _removed_unrecorded(seed: Mapping[str, Any], last_stage: str) -> bool:
    return seed.get("live") is False and last_stage not in _FINAL_STAGES


def plot_seeds(run: RunView, path: Path) -> Path:
    seeds = {str(k): v for k, v in (run.summary.get("seeds") or {}).items() if isinstance(v, dict)} \
        if isinstance(run.summary.get("seeds"), dict) else {}
    height = max(3.0, 1.2 + 0.45 * len(seeds))
    fig, ax = new_axes("Seed lifecycle timeline", "epoch", "seed", size=(9.0, height))
    rows = [(seed_id, seed) for seed_id, seed in sorted(seeds.items()) if dicts(seed.get("stage_history"))]
    if not rows:
        _no_data(ax, "seeds")
        return save_figure(fig, path)
    last_epochs = run.series("epoch")[0] or [0.0]
    end = max(last_epochs) + 1
    colors = _stage_colors()
    used: dict[str, Any] = {}
    removed_marked = False
    for row, (_, seed) in enumerate(rows):
        for start, width, stage in _seed_segments(seed, end):
            color = colors.get(stage, "#999999")
            used.setdefault(stage, color)
            ax.broken_barh([(start, width)], (row - 0.35, 0.7), facecolors=color, edgecolor="white", lw=0.5,
                           zorder=2)
        segments = _seed_segments(seed, end)
        if segments and _removed_unrecorded(seed, segments[-1][2]):
            ax.plot(segments[-1][0] + segments[-1][1], row, "kx", ms=8,
                    label="removed (stage not recorded)" if not removed_marked else None)
            removed_marked = True
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{sid} ({s.get('slot', '?')}, {s.get('blueprint', '?')})" for sid, s in rows],
                       fontsize="small")
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.invert_yaxis()
    _mark_events(ax, run)
    order = [stage_name(n) for n, _ in SeedLifecycleStage.items()]
    handles = [_patch(used[s], s.lower()) for s in sorted(used, key=lambda s: order.index(s) if s in order else 99)]
    ax.legend(handles=handles + ax.get_legend_handles_labels()[0], loc="upper left", bbox_to_anchor=(1.01, 1.0),
              fontsize="small", title="stage")
    return save_figure(fig, path)


def _patch(color: Any, label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=color, label=label)


def plot_boundary(run: RunView, path: Path) -> Path:
    boundary = run.summary.get("boundary_ms") if isinstance(run.summary.get("boundary_ms"), dict) else {}
    phases = {str(k): v for k, v in ((boundary or {}).get("phases") or {}).items() if isinstance(v, dict)}
    fig, ax = new_axes("Epoch-boundary phase timings", "phase", "milliseconds")
    if not phases:
        _no_data(ax, "boundary timings")
        return save_figure(fig, path)
    total_ms = (boundary or {}).get("total")
    if isinstance(total_ms, dict) and "total" not in phases:
        phases["total"] = total_ms  # Tolaria's own boundary work; measured against the dashed total budget
    names = list(phases)
    x = list(range(len(names)))
    p50 = [num(phases[n].get("p50")) for n in names]
    p99 = [num(phases[n].get("p99")) for n in names]
    ax.bar([i - 0.2 for i in x], p50, width=0.4, label="p50", color="#1f77b4")
    ax.bar([i + 0.2 for i in x], p99, width=0.4, label="p99", color="#aec7e8")
    budget_label = "budget"
    for i, name in enumerate(names):
        budget = num(phases[name].get("budget"))
        if math.isfinite(budget):
            ax.hlines(budget, i - 0.45, i + 0.45, colors=_ROLLBACK_COLOR, lw=2, label=budget_label)
            budget_label = "_nolegend_"
    total = num((boundary or {}).get("budget_total_ms"))
    if math.isfinite(total):
        ax.axhline(total, color="#444444", ls="--", lw=1, label=f"boundary budget {total:g} ms")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20)
    ax.legend(loc="best")
    return save_figure(fig, path)


PLOTS: dict[str, tuple[str, Callable[[RunView, Path], Path]]] = {
    "loss": ("Loss", plot_loss),
    "accuracy": ("Validation accuracy", plot_accuracy),
    "lr": ("Learning rates", plot_lr),
    "params": ("Parameter count", plot_params),
    "seeds": ("Seed lifecycle", plot_seeds),
    "boundary": ("Boundary timings", plot_boundary),
    "time": ("Wall-clock per epoch", plot_epoch_time),
    "steps": ("Step loss", plot_step_loss),
}

