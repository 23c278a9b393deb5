"""`tolaria report RUN_DIR`: one self-contained HTML page with plots of what a run did.

Contract of `generate_report(run_dir)`:

- Reads `run_dir/summary.json` (required; a missing or unparsable file raises an error naming
  the path and the fix) and `run_dir/telemetry.jsonl` (optional; lines that are not JSON objects
  are skipped and counted).
- Writes `run_dir/report/index.html` and one PNG per plot beside it (loss, accuracy, lr, params,
  seeds, boundary). Every PNG exists and is non-empty, even for a run without epochs: a plot
  without data says so in the image. The HTML embeds each PNG as base64 and links the PNG
  file, so the folder works when copied and the page works alone.
- When `run_dir/trace.json` (written by `--profile`) exists, a table of span timings is added.
- The page covers the whole run, every segment of a resumed one (the history is restored with
  each checkpoint), and marks each resume (`report_data.resume_points`) on the plots and in text.
  Seed events are marked on the loss and metric curves and listed with their reasons; the best
  epoch, the config (`run_dir/config.json`), the wall-clock per epoch and the step losses
  (`steps.csv`, else the telemetry's step packets) are shown. The plots are static PNGs.
- Missing keys mean "nothing of that kind" (a run without seeds, rollbacks or telemetry);
  unknown keys are ignored.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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
from esper.tolaria.config import flat_keys
from esper.tolaria.observe.report_data import ResumePoint, SeedEvent, resume_points, seed_events, step_losses

REPORT_DIR = "report"
DPI = 110
_ROLLBACK_COLOR = "#d62728"
_EMERGENCY_COLOR = "#ff7f0e"
_CONSERVATIVE_COLOR = "#ffdd57"
_RESUME_COLOR = "#1f77b4"
_BEST_COLOR = "#2ca02c"
SEED_MARKERS = {"GERMINATED": ("^", "germinated"), "FOSSILIZED": ("*", "fossilized"), "CULLED": ("x", "culled")}


# ------------------------------------------------------------------------------ inputs


def load_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary.json as a dict; errors name the file and what to do."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: `tolaria report` needs the run directory of a finished "
                                f"`tolaria run` (it writes summary.json at the end of the run)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); rerun or resume the run to rewrite it") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, expected a JSON object written by `tolaria run`")
    return data


@dataclass
class TelemetryStats:
    """What telemetry.jsonl held: counts by stream, message type and event description."""

    lines: int = 0
    parsed: int = 0
    skipped: int = 0
    by_stream: Counter[str] = field(default_factory=Counter)
    by_type: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)


def read_telemetry(path: Path) -> TelemetryStats:
    """Count the entries of a telemetry JSONL file, skipping (and counting) unparsable lines."""
    stats = TelemetryStats()
    if not path.is_file():
        return stats
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            stats.lines += 1
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                stats.skipped += 1
                continue
            if not isinstance(entry, dict):
                stats.skipped += 1
                continue
            stats.parsed += 1
            stats.by_stream[str(entry.get("stream", "?"))] += 1
            stats.by_type[str(entry.get("message_type", "?"))] += 1
            for event in _dicts((entry.get("payload") or {}).get("events") if isinstance(entry.get("payload"),
                                                                                       dict) else None):
                stats.events[str(event.get("description", "?"))] += 1
    return stats


def read_trace_stats(path: Path) -> list[dict[str, Any]]:
    """Per span name in a Chrome trace written by `Profiler`: count, p50/p99/max/total in ms.

    An absent file gives []; an unreadable one raises ValueError naming it (the report shows that
    message instead of the table: a damaged trace must not cost the user the whole report).
    """
    if not path.is_file():
        return []
    try:
        events = json.loads(path.read_text(encoding="utf-8")).get("traceEvents", [])
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a Chrome trace ({exc}); delete it or rerun with --profile") from exc
    durations: dict[str, list[float]] = {}
    for event in _dicts(events):
        if event.get("ph") == "X" and math.isfinite(_num(event.get("dur"))):
            durations.setdefault(str(event.get("name")), []).append(_num(event.get("dur")) / 1e3)
    rows = []
    for name, values in sorted(durations.items()):
        values.sort()
        rows.append({"span": name, "count": len(values), "p50 ms": _percentile(values, 50),
                     "p99 ms": _percentile(values, 99), "max ms": values[-1], "total ms": math.fsum(values)})
    return rows


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (numpy's default method)."""
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The dict items of a list-valued field; anything else is treated as absent."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _num(value: Any) -> float:
    """A number from the summary, NaN for null/missing/non-numeric (strict JSON writes NaN as null)."""
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, (int, float)) else math.nan


def _epochs_of(items: Iterable[Mapping[str, Any]]) -> list[float]:
    return [e for e in (_num(i.get("epoch")) for i in items) if math.isfinite(e)]


@dataclass
class RunView:
    """The parts of a summary the plots and tables use, normalised once."""

    summary: dict[str, Any]
    history: list[dict[str, Any]]
    rollbacks: list[dict[str, Any]]
    emergencies: list[dict[str, Any]]
    conservative_epochs: list[int]
    seed_events: list[SeedEvent] = field(default_factory=list)
    resumes: list[ResumePoint] = field(default_factory=list)  # filled from the run directory
    step_losses: tuple[list[int], list[float]] = field(default_factory=lambda: ([], []))

    @classmethod
    def of(cls, summary: dict[str, Any], run_dir: Path | None = None) -> RunView:
        """The view of `summary`; with `run_dir`, also its resumes and step losses (files beside it)."""
        conservative = summary.get("conservative_mode") if isinstance(summary.get("conservative_mode"), dict) else {}
        history = _dicts(summary.get("history"))
        epochs = {int(e) for e in (conservative or {}).get("epochs", []) if isinstance(e, int)}
        epochs |= {int(_num(h.get("epoch"))) for h in history if h.get("conservative_mode") is True
                   and math.isfinite(_num(h.get("epoch")))}
        return cls(summary, history, _dicts(summary.get("rollbacks")), _dicts(summary.get("emergencies")),
                   sorted(epochs), seed_events(summary),
                   resume_points(run_dir, summary) if run_dir is not None else [],
                   step_losses(run_dir) if run_dir is not None else ([], []))

    @property
    def higher_is_better(self) -> bool:
        task = self.summary.get("task") if isinstance(self.summary.get("task"), dict) else {}
        return bool((task or {}).get("higher_is_better", True))

    def best(self, metric: str) -> tuple[float, float]:
        """(best value, its epoch) of a validation metric in the task's direction; NaNs without data."""
        xs, ys = self.metric_series(metric)
        if not ys:
            return math.nan, math.nan
        sign = 1.0 if self.higher_is_better else -1.0
        k = max(range(len(ys)), key=lambda i: sign * ys[i])  # the first epoch reaching the best
        return ys[k], xs[k]

    def metric_series(self, name: str) -> tuple[list[float], list[float]]:
        """(epochs, values) of one validation metric; runs from before tasks carry only val_accuracy."""
        rows = [{"epoch": h.get("epoch"), name: (h.get("val_metrics") or {}).get(name, h.get("val_accuracy"))}
                for h in self.history]
        return RunView(self.summary, rows, [], [], []).series(name)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(epochs, values) of a numeric history key, skipping epochs where it is missing."""
        xs, ys = [], []
        for rec in self.history:
            x, y = _num(rec.get("epoch")), _num(rec.get(key))
            if math.isfinite(x) and not math.isnan(y):
                xs.append(x)
                ys.append(y)
        return xs, ys


def conservative_spans(epochs: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous runs of epochs as inclusive (first, last) pairs: [1,2,3,7] -> [(1,3),(7,7)]."""
    spans: list[tuple[int, int]] = []
    for epoch in sorted(set(epochs)):
        if spans and epoch == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], epoch)
        else:
            spans.append((epoch, epoch))
    return spans


# ------------------------------------------------------------------------------ plots


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
    for i, epoch in enumerate(_epochs_of(run.rollbacks)):
        ax.axvline(epoch, color=_ROLLBACK_COLOR, ls="--", lw=1.3, label="rollback" if i == 0 else None)
    emergencies = _epochs_of(run.emergencies)
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


def primary_metric(summary: dict[str, Any]) -> str:
    task = summary.get("task") if isinstance(summary.get("task"), dict) else {}
    return str((task or {}).get("primary_metric") or "accuracy")


def plot_lr(run: RunView, path: Path) -> Path:
    fig, ax = new_axes("Learning rate per parameter group", "epoch", "learning rate")
    groups: dict[str, tuple[list[float], list[float]]] = {}
    for rec in run.history:
        lrs, epoch = rec.get("lr"), _num(rec.get("epoch"))
        if not isinstance(lrs, dict) or not math.isfinite(epoch):
            continue
        for group, value in lrs.items():
            if math.isfinite(_num(value)):
                xs, ys = groups.setdefault(str(group), ([], []))
                xs.append(epoch)
                ys.append(_num(value))
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
    for i, step in enumerate(_num(r.get("step")) for r in run.rollbacks):
        if math.isfinite(step):
            ax.axvline(step, color=_ROLLBACK_COLOR, ls="--", lw=1.3, label="rollback" if i == 0 else None)
    _mark_resumes(ax, [float(p.step) for p in run.resumes], run.resumes)
    ax.legend(loc="best")
    return save_figure(fig, path)


def _stage_name(value: Any) -> str:
    return str(value).removeprefix("SEED_STAGE_") or "UNKNOWN"


def _stage_colors() -> dict[str, Any]:
    """One color per Leyline lifecycle stage, in lifecycle order."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]  # by stage number: fossilized lands on gray, which reads as "frozen"
    return {_stage_name(name): cmap(number % 10) for name, number in SeedLifecycleStage.items()}


def _seed_segments(seed: Mapping[str, Any], end_epoch: float) -> list[tuple[float, float, str]]:
    """(start, width, stage) per stage the seed went through; the last one lasts until `end_epoch`,
    except for a seed no longer live whose removal was not recorded: its bar stops one epoch after
    its last recorded change (the plot marks that end)."""
    steps = sorted(((_num(h.get("epoch")), _stage_name(h.get("stage", ""))) for h in _dicts(seed.get("stage_history"))
                    if math.isfinite(_num(h.get("epoch")))), key=lambda s: s[0])
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


_FINAL_STAGES = frozenset(_stage_name(SeedLifecycleStage.Name(n)) for n in (
    SEED_STAGE_FOSSILIZED, SEED_STAGE_CULLED, SEED_STAGE_TERMINATED, SEED_STAGE_EMBARGOED))


_GONE_STAGES = frozenset(_stage_name(SeedLifecycleStage.Name(n)) for n in (SEED_STAGE_CULLED, SEED_STAGE_TERMINATED))


def _removed_unrecorded(seed: Mapping[str, Any], last_stage: str) -> bool:
    return seed.get("live") is False and last_stage not in _FINAL_STAGES


def plot_seeds(run: RunView, path: Path) -> Path:
    seeds = {str(k): v for k, v in (run.summary.get("seeds") or {}).items() if isinstance(v, dict)} \
        if isinstance(run.summary.get("seeds"), dict) else {}
    height = max(3.0, 1.2 + 0.45 * len(seeds))
    fig, ax = new_axes("Seed lifecycle timeline", "epoch", "seed", size=(9.0, height))
    rows = [(seed_id, seed) for seed_id, seed in sorted(seeds.items()) if _dicts(seed.get("stage_history"))]
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
    order = [_stage_name(n) for n, _ in SeedLifecycleStage.items()]
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
    p50 = [_num(phases[n].get("p50")) for n in names]
    p99 = [_num(phases[n].get("p99")) for n in names]
    ax.bar([i - 0.2 for i in x], p50, width=0.4, label="p50", color="#1f77b4")
    ax.bar([i + 0.2 for i in x], p99, width=0.4, label="p99", color="#aec7e8")
    budget_label = "budget"
    for i, name in enumerate(names):
        budget = _num(phases[name].get("budget"))
        if math.isfinite(budget):
            ax.hlines(budget, i - 0.45, i + 0.45, colors=_ROLLBACK_COLOR, lw=2, label=budget_label)
            budget_label = "_nolegend_"
    total = _num((boundary or {}).get("budget_total_ms"))
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


# ------------------------------------------------------------------------------ HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{margin-bottom:.2rem} h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem} th,td{border:1px solid #ddd;padding:.25rem .6rem;
text-align:left} th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#b00020;font-weight:600} .good{color:#1b7f3b} .muted{color:#777}
figure{margin:1rem 0} figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:.85rem;color:#555}
"""


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return f'<td class="{"good" if value else "bad"}">{value}</td>'
    if isinstance(value, float):
        return f'<td class="num">{_fmt(value)}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value:,}</td>'
    if isinstance(value, (dict, list)):
        return f"<td>{escape(json.dumps(value, sort_keys=True))}</td>"
    return f"<td>{escape('' if value is None else value)}</td>"


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.4g}"


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _header_rows(run: RunView, telemetry: TelemetryStats) -> list[tuple[str, Any]]:
    s = run.summary
    seeds = s.get("seeds") if isinstance(s.get("seeds"), dict) else {}
    stages = Counter(_stage_name(v.get("stage", "")) for v in (seeds or {}).values() if isinstance(v, dict))
    tel = s.get("telemetry") if isinstance(s.get("telemetry"), dict) else {}
    drills = _dicts(s.get("drills"))
    return [
        ("run id", s.get("run_id", "?")),
        ("config", s.get("config_path", s.get("experiment", ""))),
        ("epochs completed", s.get("epochs_completed", len(run.history))),
        (f"final validation {primary_metric(s)}", _num((s.get("final_val_metrics") or {}).get(
            primary_metric(s), s.get("final_val_accuracy")))),
        ("final validation loss", _num(s.get("final_val_loss"))),
        (f"best validation {primary_metric(s)}", _best_text(run)),
        ("training time", f"{math.fsum(run.series('epoch_seconds')[1]):.1f} s over {len(run.history)} epochs"),
        ("resumed", _resumed_text(run)),
        ("parameters", s.get("param_count", "?")),
        ("morphogenesis", s.get("morphogenesis", "?")),
        ("seeds fossilized / culled / total", f"{stages['FOSSILIZED']} / {stages['CULLED']} / {len(seeds or {})}"),
        ("rollbacks", len(run.rollbacks)),
        ("emergencies", len(run.emergencies)),
        ("conservative-mode epochs", len(run.conservative_epochs)),
        ("telemetry published / dropped", f"{(tel or {}).get('published', 0)} / {(tel or {}).get('dropped', 0)}"),
        ("telemetry.jsonl lines (skipped)", f"{telemetry.lines} ({telemetry.skipped})"),
        ("drills", ", ".join(f"{d.get('kind')}@{d.get('epoch')}: {d.get('outcome')}" for d in drills) or "none"),
        ("final state sha256", str(s.get("final_state_sha256", ""))[:16]),
    ]


def _best_text(run: RunView) -> str:
    best, epoch = run.best(primary_metric(run.summary))
    return "n/a" if math.isnan(best) else f"{best:.4g} at epoch {epoch:g}"


def _resumed_text(run: RunView) -> str:
    if not run.resumes:
        return "no"
    where = ", ".join(f"at epoch {p.epoch} (step {p.step}, from {p.checkpoint})" for p in run.resumes)
    return f"yes, {len(run.resumes)}× ({where})"


def _seed_event_sections(run: RunView) -> str:
    rows = [{"epoch": e.epoch, "seed": e.seed_id, "event": e.stage.lower(), "reason": e.reason}
            for e in run.seed_events]
    culls = [e for e in run.seed_events if e.stage == "CULLED"]
    cull_list = ("<ul>" + "".join(f"<li>{escape(e.seed_id)} at epoch {e.epoch}: {escape(e.reason)}</li>"
                                  for e in culls) + "</ul>") if culls else '<p class="muted">No seed was culled.</p>'
    return ('<h2 id="seed-events">Seed events</h2><p>Marked on the loss and metric curves: ▲ germinated, '
            "★ fossilized, × culled. The reason is the boundary command's.</p>"
            + html_table(rows, ["epoch", "seed", "event", "reason"], "No seed events.")
            + f'<h2 id="cull-reasons">Cull reasons</h2>{cull_list}')


def _resume_section(run: RunView) -> str:
    epochs = run.series("epoch")[0]
    covered = (f"The page covers epochs {epochs[0]:g} to {epochs[-1]:g}, every segment of the run."
               if epochs else "No epochs recorded.")
    if not run.resumes:
        return f'<h2 id="resumes">Resumes</h2><p>Not resumed: one process ran the whole run. {covered}</p>'
    rows = [{"resume": i + 1, "resumed at epoch": p.epoch, "from step": p.step, "checkpoint": p.checkpoint}
            for i, p in enumerate(run.resumes)]
    return (f'<h2 id="resumes">Resumes</h2><p>This run was resumed {len(run.resumes)}×. {covered} Each resume '
            "is a dotted blue line on the plots.</p>"
            + html_table(rows, ["resume", "resumed at epoch", "from step", "checkpoint"], ""))


def _config_section(config: Mapping[str, Any]) -> str:
    rows = [{"key": k, "value": v} for k, v in sorted(flat_keys(config).items())]
    return ('<h2 id="config">Config</h2><p>The effective config, from <a href="../config.json">config.json</a> '
            "(the keys as <code>--set</code> spells them).</p>"
            + html_table(rows, ["key", "value"], "No config.json in the run directory."))


def _image(name: str, title: str, png: Path, embed: bool) -> str:
    src = f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" if embed else png.name
    return (f'<figure id="{name}"><img alt="{escape(title)}" src="{src}">'
            f'<figcaption>{escape(title)} — <a href="{escape(png.name)}">{escape(png.name)}</a></figcaption></figure>')


def _profile_section(trace_rows: Sequence[Mapping[str, Any]], problem: str) -> str:
    if problem:
        return f'<h2>Profile</h2><p class="bad">{escape(problem)}</p>'
    if not trace_rows:
        return ('<h2>Profile</h2><p class="muted">No trace.json: run with <code>--profile</code> to record '
                "step and boundary spans.</p>")
    return ("<h2>Profile</h2><p>Spans from <a href=\"../trace.json\">trace.json</a> (open it in "
            "<a href=\"https://ui.perfetto.dev\">Perfetto</a> or chrome://tracing).</p>"
            + html_table(trace_rows, ["span", "count", "p50 ms", "p99 ms", "max ms", "total ms"], ""))


def _sections(run: RunView, telemetry: TelemetryStats) -> list[str]:
    s = run.summary
    spans = [{"first epoch": a, "last epoch": b, "epochs": b - a + 1}
             for a, b in conservative_spans(run.conservative_epochs)]
    cons = s.get("conservative_mode") if isinstance(s.get("conservative_mode"), dict) else {}
    reasons = [str(r) for r in (cons or {}).get("reasons", [])]
    seeds = s.get("seeds") if isinstance(s.get("seeds"), dict) else {}
    seed_rows = [{"seed": k, "slot": v.get("slot"), "blueprint": v.get("blueprint"), "stage": v.get("stage"),
                  "path": " → ".join(f"{_stage_name(h.get('stage'))}@{h.get('epoch')}"
                                     for h in _dicts(v.get("stage_history")))}
                 for k, v in sorted((seeds or {}).items()) if isinstance(v, dict)]
    breakers = s.get("breakers") if isinstance(s.get("breakers"), dict) else {}
    breaker_rows = [{"breaker": k, **v} for k, v in sorted((breakers or {}).items()) if isinstance(v, dict)]
    tel_rows = [{"stream": k, "entries": n} for k, n in telemetry.by_stream.most_common()]
    event_rows = [{"event": k, "count": n} for k, n in telemetry.events.most_common()]
    return [
        "<h2>Rollbacks</h2>" + html_table(run.rollbacks, ["rollback_id", "tier", "epoch", "step", "target_epoch",
                                                      "target_step", "reason", "succeeded", "phase_ms"],
                                      "No rollbacks."),
        "<h2>Emergencies</h2>" + html_table(run.emergencies, ["level", "kind", "reason", "epoch", "step", "action",
                                                          "ok", "duration_ms", "escalated_to"], "No emergencies."),
        "<h2>Conservative mode</h2>" + html_table(spans, ["first epoch", "last epoch", "epochs"],
                                              "Never entered conservative mode.")
        + (f"<p>Entered {cons.get('entered', 0)}×, exited {cons.get('exited', 0)}×. Reasons: "
           + escape("; ".join(reasons)) + "</p>" if cons and reasons else ""),
        "<h2>Seeds</h2>" + html_table(seed_rows, ["seed", "slot", "blueprint", "stage", "path"], "No seeds."),
        "<h2>Drills</h2>" + html_table(_dicts(s.get("drills")), ["kind", "epoch", "step", "outcome"], "No drills."),
        "<h2>Circuit breakers</h2>" + html_table(breaker_rows,
                                                 ["breaker", "state", "failures", "opened", "last_reason"],
                                                 "No breaker data."),
        "<h2>Telemetry</h2>" + html_table(tel_rows, ["stream", "entries"], "No telemetry.jsonl entries.")
        + html_table(event_rows, ["event", "count"], "No telemetry events."),
    ]


def render_html(run: RunView, telemetry: TelemetryStats, pngs: Mapping[str, Path], *, embed: bool = True,
                trace_rows: Sequence[Mapping[str, Any]] = (), trace_problem: str = "",
                config: Mapping[str, Any] | None = None) -> str:
    """The report page; `pngs` maps plot name -> PNG path in the report folder."""
    title = f"Tolaria run {run.summary.get('run_id', '?')}"
    header = "".join(f"<tr><th>{escape(k)}</th>{_cell(v)}</tr>" for k, v in _header_rows(run, telemetry))
    images = "".join(_image(name, PLOTS[name][0], png, embed) for name, png in pngs.items())
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1>"
            f"<table>{header}</table>{_resume_section(run)}<h2>Plots</h2>"
            '<p class="muted">Static PNGs drawn by matplotlib (no zoom); each links its file.</p>'
            f"{images}{_seed_event_sections(run)}{''.join(_sections(run, telemetry))}"
            f"{_config_section(config or {})}{_profile_section(trace_rows, trace_problem)}</body></html>")


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/config.json, or {} when it is absent or unreadable (the report then says so)."""
    try:
        data = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _trace_rows(path: Path) -> tuple[list[dict[str, Any]], str]:
    try:
        return read_trace_stats(path), ""
    except ValueError as exc:
        return [], str(exc)


def generate_report(run_dir: Path, *, embed_images: bool = True) -> Path:
    """Write `run_dir/report/index.html` and its PNGs; returns the HTML path (see module docstring)."""
    run_dir = Path(run_dir)
    run = RunView.of(load_summary(run_dir), run_dir)
    telemetry = read_telemetry(run_dir / "telemetry.jsonl")
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    pngs = {name: plot(run, out / f"{name}.png") for name, (_, plot) in PLOTS.items()}
    index = out / "index.html"
    tmp = index.with_suffix(".html.tmp")
    trace_rows, trace_problem = _trace_rows(run_dir / "trace.json")
    page = render_html(run, telemetry, pngs, embed=embed_images, trace_rows=trace_rows, trace_problem=trace_problem,
                       config=read_run_config(run_dir))
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)  # a reader never sees half a page
    return index
