"""The engine behind `tolaria bench`: discover figures, measure them, print, compare.

Contract of `run_bench`:

- Every figure registered with `esper.tolaria.bench.registry.figure` is measured (those in
  `esper.tolaria.bench.figures_*` modules are imported first by `discover()`), in registration order.
- A figure function returns a list of per-trial values. The harness calls it until it has at least
  `trials` values (3 quick, 7 full, unless given); a figure that runs its own trials returns them
  all in one call and is called once. Warm-up is the figure's business.
- The reported `value` is the median; `spread` is (max - min) / |median|; `iqr` is the
  interquartile range in the figure's unit; `ok` compares the median with the goal.
- Figures that need Redis (`needs="redis"`) are skipped with `"skipped": "needs --oona"` when no
  URL is given, and count neither as ok nor as failed. With a URL they read it from the
  environment variable `TOLARIA_BENCH_OONA`, set for the duration of the run.
- A figure that raises, or returns no finite values, is reported with `"error"` and `ok: false`;
  the bench goes on with the next figure.
- `device` picks the figures: "cpu" (the default) measures the CPU figures, "cuda" the CUDA ones
  (`figures_cuda`), and only where torch sees a CUDA device: elsewhere it is a `ValueError` that
  says so before anything is measured. The result's `machine` names the GPU then.
"""

from __future__ import annotations

import datetime as dt
import importlib
import logging
import math
import os
import pkgutil
import platform
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from esper.tolaria.bench import registry
from esper.tolaria.bench.registry import FigureSpec, figure
from esper.tolaria.observe.profiling import Profiler

log = logging.getLogger(__name__)

OONA_URL_ENV = "TOLARIA_BENCH_OONA"
QUICK_TRIALS = 3
FULL_TRIALS = 7
SKIPPED_NEEDS_OONA = "needs --oona"

FigureCallback = Callable[[str, dict[str, Any]], None]


def discover() -> dict[str, str | None]:
    """Import every `esper.tolaria.bench.figures_*` module present.

    Returns module name -> None when imported, or the import error as text. A module that fails
    to import is logged and reported, not fatal: the other areas' figures still run.
    """
    import esper.tolaria.bench as package

    found: dict[str, str | None] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not info.name.startswith("figures_"):
            continue
        module = f"{package.__name__}.{info.name}"
        try:
            importlib.import_module(module)
            found[module] = None
        except ImportError as exc:  # a missing optional dependency disables that area only
            log.warning("bench: could not import %s: %s", module, exc)
            found[module] = f"{type(exc).__name__}: {exc}"
    return found


def run_bench(*, quick: bool, only: list[str] | None, oona_url: str | None, trials: int | None,
              figures: Mapping[str, FigureSpec] | None = None,
              on_figure: FigureCallback | None = None, device: str = "cpu") -> dict[str, Any]:
    """Measure the figures and return the bench result (see the module docstring).

    `figures` replaces the registry (tests pass their own); `on_figure(name, entry)` is called
    after each figure, for progress output.
    """
    if trials is not None and trials < 1:
        raise ValueError(f"bench trials must be >= 1, got {trials}")
    require_device(device)
    import_errors = discover() if figures is None else {}
    specs = dict(registry.FIGURES if figures is None else figures)
    selected = _select(specs, only, device)
    wanted = trials if trials is not None else (QUICK_TRIALS if quick else FULL_TRIALS)
    results: dict[str, dict[str, Any]] = {}
    with _oona_env(oona_url):
        for spec in selected:
            entry = _measure(spec, quick=quick, trials=wanted, has_oona=bool(oona_url))
            results[spec.name] = entry
            if on_figure is not None:
                on_figure(spec.name, entry)
    return {
        "figures": results,
        "counts": _counts(results),
        "import_errors": {k: v for k, v in import_errors.items() if v is not None},
        "machine": machine_info(device),
        "device": device,
        "quick": quick,
        "trials": wanted,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


BENCH_DEVICES = ("cpu", "cuda")


def require_device(device: str) -> None:
    """A bench device that exists here, or a ValueError naming the problem and the fix."""
    if device not in BENCH_DEVICES:
        raise ValueError(f"bench device {device!r} is not one of {', '.join(BENCH_DEVICES)}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            built = torch.version.cuda or "no CUDA (a CPU build)"
            raise ValueError(f"--device cuda: torch {torch.__version__} (built for {built}) sees no CUDA device; "
                             "run the CUDA figures on a machine with a GPU, or leave --device out for the CPU ones")


def _select(specs: dict[str, FigureSpec], only: list[str] | None, device: str = "cpu") -> list[FigureSpec]:
    if not only:
        return [spec for spec in specs.values() if spec.device == device]
    unknown = [name for name in only if name not in specs]
    if unknown:
        raise ValueError(f"unknown bench figure(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(specs)) or '(none registered)'}")
    elsewhere = [f"{name} (--device {specs[name].device})" for name in only if specs[name].device != device]
    if elsewhere:
        raise ValueError(f"bench figure(s) {', '.join(elsewhere)} are not measured with --device {device}")
    return [specs[name] for name in only]


@contextmanager
def _oona_env(url: str | None) -> Iterator[None]:
    """Expose the Redis URL to the Oona figures for the duration of the bench, then restore."""
    previous = os.environ.get(OONA_URL_ENV)
    if url:
        os.environ[OONA_URL_ENV] = url
    try:
        yield
    finally:
        if url:
            if previous is None:
                os.environ.pop(OONA_URL_ENV, None)
            else:
                os.environ[OONA_URL_ENV] = previous


def _measure(spec: FigureSpec, *, quick: bool, trials: int, has_oona: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"unit": spec.unit, "goal": spec.goal, "better": spec.better}
    if spec.needs == "redis" and not has_oona:
        return {**entry, "skipped": SKIPPED_NEEDS_OONA, "ok": None}
    started = time.perf_counter()
    try:
        values = _collect(spec, quick=quick, trials=trials)
    except Exception as exc:  # noqa: BLE001 - one broken figure must not end the bench; it is reported as an error
        tail = traceback.format_exc(limit=-3)
        log.warning("bench figure %s raised: %s", spec.name, exc)
        return {**entry, "error": f"{type(exc).__name__}: {exc}", "traceback": tail, "ok": False,
                "seconds": time.perf_counter() - started}
    return {**entry, **summarize(values), "ok": spec.ok(float(np.median(values))), "trials": values,
            "seconds": time.perf_counter() - started}


def _collect(spec: FigureSpec, *, quick: bool, trials: int) -> list[float]:
    values: list[float] = []
    while len(values) < trials:
        got = spec.fn(quick)
        if not isinstance(got, (list, tuple)) or not got:
            raise TypeError(f"figure {spec.name} returned {got!r}: it must return a non-empty list of floats")
        batch = [float(v) for v in got]
        bad = [v for v in batch if not math.isfinite(v)]
        if bad:
            raise ValueError(f"figure {spec.name} returned non-finite values {bad}: every trial must be finite")
        values.extend(batch)
    return values


def summarize(values: list[float]) -> dict[str, float]:
    """Median, min, max, relative spread (max-min over |median|) and IQR of the trial values."""
    arr = np.asarray(values, dtype=np.float64)
    median = float(np.median(arr))
    lo, hi = float(arr.min()), float(arr.max())
    q1, q3 = np.percentile(arr, [25, 75])
    spread = (hi - lo) / abs(median) if median != 0 else (0.0 if hi == lo else math.inf)
    return {"value": median, "min": lo, "max": hi, "spread": spread, "iqr": float(q3 - q1)}


def _counts(results: dict[str, dict[str, Any]]) -> dict[str, int]:
    return {
        "ok": sum(1 for r in results.values() if r["ok"] is True),
        "failed": sum(1 for r in results.values() if r["ok"] is False and "error" not in r),
        "errors": sum(1 for r in results.values() if "error" in r),
        "skipped": sum(1 for r in results.values() if "skipped" in r),
    }


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on; no hostname or user. A CUDA bench names the GPU."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: fall back to what platform knows
        pass
    return platform.processor() or platform.machine() or "unknown"


# ------------------------------------------------------------------------------ printing


def print_table(result: Mapping[str, Any], *, console: Console | None = None) -> None:
    """One row per figure: median beside its goal, spread, and ok / FAIL / ERROR / skipped."""
    console = console or Console()
    mode = "quick" if result.get("quick") else "full"
    machine = result.get("machine", {})
    table = Table(title=f"tolaria bench ({mode}, {machine.get('gpu') or machine.get('cpu', '?')})")
    table.add_column("figure", no_wrap=True)
    for column in ("value", "goal", "spread"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("status")
    for name, entry in result.get("figures", {}).items():
        table.add_row(name, _value_text(entry), _goal_text(entry), _spread_text(entry), _status_text(entry))
    console.print(table)
    counts = result.get("counts") or _counts(result.get("figures", {}))
    console.print(f"{counts['ok']} ok, {counts['failed']} failed, {counts['errors']} errors, "
                  f"{counts['skipped']} skipped")
    for module, error in result.get("import_errors", {}).items():
        console.print(f"[red]could not import {module}[/red]: {error}")


def _fmt(value: float) -> str:
    if value == 0 or 0.01 <= abs(value) < 1e6:
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:.3g}"


def _value_text(entry: Mapping[str, Any]) -> str:
    return f"{_fmt(entry['value'])} {entry.get('unit', '')}".rstrip() if "value" in entry else "-"


def _goal_text(entry: Mapping[str, Any]) -> str:
    sign = "≤" if entry.get("better") == "lower" else "≥"
    return f"{sign} {_fmt(float(entry['goal']))} {entry.get('unit', '')}".rstrip()


def _spread_text(entry: Mapping[str, Any]) -> str:
    return f"{entry['spread']:.0%}" if "spread" in entry and math.isfinite(entry["spread"]) else "-"


def _status_text(entry: Mapping[str, Any]) -> str:
    if "skipped" in entry:
        return f"[yellow]skipped ({entry['skipped']})[/yellow]"
    if "error" in entry:
        return f"[bold red]ERROR[/bold red] {entry['error']}"
    return "[green]ok[/green]" if entry.get("ok") else "[bold red]FAIL[/bold red]"


# ------------------------------------------------------------------------------ comparing


@dataclass(frozen=True)
class Regression:
    """A figure that got worse between two bench results.

    `change` is the relative move in the bad direction (0.25 = 25 % worse; inf when the old value
    was 0 or the new run errored).
    """

    name: str
    unit: str
    better: str
    old: float
    new: float | None
    change: float
    reason: str


def compare(old: Mapping[str, Any], new: Mapping[str, Any], *, threshold: float = 0.10) -> list[Regression]:
    """Figures present in both results that moved the bad way by more than `threshold`
    (relative to the old median), plus figures that measured before and error now.

    Skipped figures and figures missing on either side are not compared.
    """
    if threshold < 0:
        raise ValueError(f"compare threshold must be >= 0, got {threshold}")
    out: list[Regression] = []
    old_figs, new_figs = old.get("figures", {}), new.get("figures", {})
    for name, before in old_figs.items():
        after = new_figs.get(name)
        if after is None or "value" not in before or "skipped" in after:
            continue
        better = str(after.get("better", before.get("better", "lower")))
        unit = str(after.get("unit", before.get("unit", "")))
        if "error" in after:
            out.append(Regression(name, unit, better, before["value"], None, math.inf, f"now errors: {after['error']}"))
            continue
        change = _worse_by(float(before["value"]), float(after["value"]), better)
        if change > threshold:
            out.append(Regression(name, unit, better, before["value"], after["value"], change,
                                  f"{change:.0%} worse ({better} is better)"))
    return out


def _worse_by(old: float, new: float, better: str) -> float:
    delta = (new - old) if better == "lower" else (old - new)
    if old == 0:
        return math.inf if delta > 0 else 0.0
    return delta / abs(old)


def print_compare(regressions: list[Regression], *, console: Console | None = None) -> None:
    """A table of regressions, or one green line when there are none."""
    console = console or Console()
    if not regressions:
        console.print("[green]no regressions[/green]")
        return
    table = Table(title=f"{len(regressions)} regression(s)")
    for column in ("figure", "old", "new", "unit", "change"):
        table.add_column(column)
    for reg in regressions:
        new = _fmt(reg.new) if reg.new is not None else "-"
        table.add_row(reg.name, _fmt(reg.old), new, reg.unit, f"[bold red]{reg.reason}[/bold red]")
    console.print(table)


# ------------------------------------------------------------------------------ profiler figures
# The profiler's own cost lives beside the harness that depends on it being cheap.


def _empty_loop_ns(n: int) -> int:
    started = time.perf_counter_ns()
    for _ in range(n):
        pass
    return time.perf_counter_ns() - started


def _span_loop_ns(prof: Profiler, n: int) -> int:
    started = time.perf_counter_ns()
    for _ in range(n):
        with prof.span("step.forward"):
            pass
    return time.perf_counter_ns() - started


def _span_cost_ns(enabled: bool, quick: bool) -> list[float]:
    n, trials = (20_000, 5) if quick else (100_000, 9)
    out: list[float] = []
    for _ in range(trials):
        # a fresh profiler per trial keeps the enabled case's event list from growing across trials
        prof = Profiler(enabled, max_events=n)
        _span_loop_ns(prof, n // 10)  # warm-up
        prof = Profiler(enabled, max_events=n)
        span_ns, loop_ns = _span_loop_ns(prof, n), _empty_loop_ns(n)
        out.append(max(0.0, (span_ns - loop_ns) / n))
    return out


@figure("profiler_off_overhead_ns", unit="ns", goal=300, better="lower")
def profiler_off_overhead_ns(quick: bool) -> list[float]:
    """Cost of one `with profiler.span(name):` while profiling is off, in ns per span, with the
    bare loop's cost measured beside it and subtracted. Goal ≤ 300 ns."""
    return _span_cost_ns(False, quick)


@figure("profiler_on_overhead_ns", unit="ns", goal=5_000, better="lower")
def profiler_on_overhead_ns(quick: bool) -> list[float]:
    """Cost of one recorded span (timestamps, per-phase stats, trace event) while profiling is
    on, in ns per span, bare loop subtracted. Goal ≤ 5 µs: about 15 spans a step stay < 0.1 ms."""
    return _span_cost_ns(True, quick)
