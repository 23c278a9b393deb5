"""`tolaria bench` harness: trials, medians, goals, skips, errors, JSON shape, comparisons."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import pytest
from rich.console import Console

from esper.tolaria.bench import harness, registry
from esper.tolaria.bench.harness import OONA_URL_ENV, compare, discover, print_compare, print_table, run_bench
from esper.tolaria.bench.registry import FigureSpec


def _spec(name: str, fn: Any, *, goal: float = 10.0, better: str = "lower", needs: str = "") -> FigureSpec:
    return FigureSpec(name=name, unit="ms", goal=goal, better=better, fn=fn, needs=needs)  # type: ignore[arg-type]


def _toy_figures(calls: dict[str, int]) -> dict[str, FigureSpec]:
    def one_value(quick: bool) -> list[float]:
        calls["one_value"] = calls.get("one_value", 0) + 1
        return [float(calls["one_value"])]  # 1, 2, 3, ... per call

    def own_trials(quick: bool) -> list[float]:
        calls["own_trials"] = calls.get("own_trials", 0) + 1
        return [5.0, 1.0, 3.0, 2.0, 4.0]

    def raises(quick: bool) -> list[float]:
        raise RuntimeError("fixture exploded")

    def redis_only(quick: bool) -> list[float]:
        return [float(len(os.environ[OONA_URL_ENV]))]

    return {
        "one_value": _spec("one_value", one_value, goal=2.5),
        "own_trials": _spec("own_trials", own_trials, goal=2.0, better="higher"),
        "raises": _spec("raises", raises),
        "redis_only": _spec("redis_only", redis_only, needs="redis", goal=100.0),
    }


def test_harness_calls_a_figure_until_it_has_the_trials_and_reports_the_median() -> None:
    calls: dict[str, int] = {}
    result = run_bench(quick=True, only=None, oona_url=None, trials=None, figures=_toy_figures(calls))
    fig = result["figures"]["one_value"]
    assert calls["one_value"] == 3  # quick: 3 trials, one value per call
    assert fig["trials"] == [1.0, 2.0, 3.0]
    assert fig["value"] == 2.0 and fig["min"] == 1.0 and fig["max"] == 3.0
    assert fig["spread"] == pytest.approx(1.0)  # (3 - 1) / 2
    assert fig["ok"] is True  # 2.0 <= 2.5


def test_a_figure_that_runs_its_own_trials_is_called_once_and_compared_in_its_direction() -> None:
    calls: dict[str, int] = {}
    result = run_bench(quick=False, only=["own_trials"], oona_url=None, trials=5, figures=_toy_figures(calls))
    fig = result["figures"]["own_trials"]
    assert calls["own_trials"] == 1
    assert fig["value"] == 3.0 and fig["iqr"] == pytest.approx(2.0)
    assert fig["better"] == "higher" and fig["ok"] is True  # 3.0 >= 2.0
    assert list(result["figures"]) == ["own_trials"]


def test_full_mode_takes_seven_trials() -> None:
    calls: dict[str, int] = {}
    result = run_bench(quick=False, only=["one_value"], oona_url=None, trials=None, figures=_toy_figures(calls))
    assert len(result["figures"]["one_value"]["trials"]) == 7
    assert result["figures"]["one_value"]["ok"] is False  # median 4.0 > goal 2.5
    assert result["counts"] == {"ok": 0, "failed": 1, "errors": 0, "skipped": 0}


def test_raising_figure_is_reported_as_error_and_the_bench_continues() -> None:
    result = run_bench(quick=True, only=None, oona_url=None, trials=None, figures=_toy_figures({}))
    err = result["figures"]["raises"]
    assert err["ok"] is False
    assert err["error"] == "RuntimeError: fixture exploded"
    assert "value" not in err
    assert result["figures"]["redis_only"]["skipped"]  # the figures after it still ran
    assert result["counts"]["errors"] == 1


def test_redis_figures_are_skipped_without_oona_and_not_counted() -> None:
    result = run_bench(quick=True, only=None, oona_url=None, trials=None, figures=_toy_figures({}))
    skipped = result["figures"]["redis_only"]
    assert skipped["skipped"] == "needs --oona"
    assert skipped["ok"] is None
    assert result["counts"] == {"ok": 2, "failed": 0, "errors": 1, "skipped": 1}


def test_oona_url_reaches_redis_figures_through_the_environment_and_is_restored(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(OONA_URL_ENV, raising=False)
    url = "redis://127.0.0.1:1/0"
    result = run_bench(quick=True, only=["redis_only"], oona_url=url, trials=None, figures=_toy_figures({}))
    assert result["figures"]["redis_only"]["value"] == float(len(url))
    assert OONA_URL_ENV not in os.environ


def test_figure_returning_nothing_or_nan_is_an_error_naming_the_fix() -> None:
    figures = {"empty": _spec("empty", lambda quick: []), "nan": _spec("nan", lambda quick: [math.nan])}
    result = run_bench(quick=True, only=None, oona_url=None, trials=None, figures=figures)
    assert "must return a non-empty list" in result["figures"]["empty"]["error"]
    assert "non-finite" in result["figures"]["nan"]["error"]


def test_unknown_only_name_is_rejected_listing_the_known_figures() -> None:
    with pytest.raises(ValueError, match=r"unknown bench figure\(s\) nope; known: .*one_value"):
        run_bench(quick=True, only=["nope"], oona_url=None, trials=None, figures=_toy_figures({}))


def test_result_is_json_with_machine_info_and_no_hostname() -> None:
    result = run_bench(quick=True, only=None, oona_url=None, trials=2, figures=_toy_figures({}))
    text = json.dumps(result)
    back = json.loads(text)
    assert set(back) >= {"figures", "machine", "quick", "created_at"}
    assert back["quick"] is True
    assert set(back["machine"]) >= {"cpu", "cores", "torch", "torch_threads", "python", "platform"}
    assert os.uname().nodename not in json.dumps(back["machine"])
    fig = back["figures"]["one_value"]
    assert set(fig) >= {"value", "unit", "goal", "better", "ok", "trials", "spread"}


def test_registry_figures_run_by_default_and_discover_tolerates_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    imported = discover()
    assert all(name.startswith("esper.tolaria.bench.figures_") for name in imported)
    monkeypatch.setattr(registry, "FIGURES", {})
    monkeypatch.setattr(harness, "discover", lambda: {"esper.tolaria.bench.figures_gone": "ImportError: x"})
    registry.figure("toy_higher", unit="x", goal=1.0, better="higher")(lambda quick: [2.0])
    result = run_bench(quick=True, only=None, oona_url=None, trials=None)
    assert list(result["figures"]) == ["toy_higher"]
    assert result["figures"]["toy_higher"]["ok"] is True
    assert result["import_errors"] == {"esper.tolaria.bench.figures_gone": "ImportError: x"}


def test_profiler_off_figure_returns_one_nonnegative_value_per_trial() -> None:
    values = harness.profiler_off_overhead_ns(True)
    assert len(values) == 5
    assert all(v >= 0 and math.isfinite(v) for v in values)


def _result(**values: tuple[float, str] | str) -> dict[str, Any]:
    figs: dict[str, Any] = {}
    for name, spec in values.items():
        if isinstance(spec, str):
            figs[name] = {"unit": "ms", "goal": 1.0, "better": "lower", "ok": False, "error": spec}
        else:
            figs[name] = {"value": spec[0], "unit": "ms", "goal": 1.0, "better": spec[1], "ok": True}
    return {"figures": figs}


def test_compare_flags_only_moves_in_the_bad_direction_beyond_threshold() -> None:
    old = _result(lat=(10.0, "lower"), tput=(100.0, "higher"), small=(10.0, "lower"), better_now=(10.0, "lower"),
                  broken=(5.0, "lower"), gone=(1.0, "lower"))
    new = _result(lat=(12.0, "lower"), tput=(80.0, "higher"), small=(10.5, "lower"), better_now=(5.0, "lower"),
                  broken="RuntimeError: x")
    regs = {r.name: r for r in compare(old, new)}
    assert set(regs) == {"lat", "tput", "broken"}
    assert regs["lat"].change == pytest.approx(0.2)
    assert regs["tput"].change == pytest.approx(0.2)
    assert regs["broken"].new is None and regs["broken"].change == math.inf
    assert compare(old, new, threshold=0.25) == [regs["broken"]]


def test_compare_ignores_skipped_figures_and_handles_zero_baselines() -> None:
    old = _result(zero=(0.0, "lower"), same=(0.0, "lower"), skip=(1.0, "lower"))
    new = _result(zero=(0.5, "lower"), same=(0.0, "lower"))
    new["figures"]["skip"] = {"unit": "ms", "goal": 1.0, "better": "lower", "ok": None, "skipped": "needs --oona"}
    regs = compare(old, new)
    assert [r.name for r in regs] == ["zero"] and regs[0].change == math.inf


def test_print_table_and_compare_show_each_figure_and_its_status() -> None:
    figures = {**_toy_figures({}), "too_slow": _spec("too_slow", lambda quick: [50.0])}
    result = run_bench(quick=True, only=None, oona_url=None, trials=None, figures=figures)
    console = Console(record=True, width=200, color_system=None)
    print_table(result, console=console)
    text = console.export_text()
    for needle in ("one_value", "≤ 2.5", "≥ 2", "ok", "FAIL", "ERROR", "fixture exploded", "skipped (needs --oona)"):
        assert needle in text
    print_compare(compare(_result(a=(1.0, "lower")), _result(a=(2.0, "lower"))), console=console)
    print_compare([], console=console)
    text = console.export_text()
    assert "100% worse" in text and "no regressions" in text
