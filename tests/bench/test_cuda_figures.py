"""`tolaria bench --device cuda`: the GPU figures are registered with the issue's goals, measured
only with --device cuda (a clear error where torch sees no CUDA device), and each figure's code
runs on the CPU at toy sizes, so a GPU machine finds no bug that a CPU could have."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from esper.tolaria.bench import registry
from esper.tolaria.bench.figures_cuda import (
    LM_10M,
    LM_100M,
    LMSize,
    measure_checkpoint_stall,
    measure_fast_rollback,
    measure_snapshot_gpu_bytes,
    measure_step_overhead,
)
from esper.tolaria.bench.harness import discover, run_bench
from esper.tolaria.bench.registry import FigureSpec
from esper.tolaria.cli import main

TOY = LMSize(width=32, layers=1, heads=2, context=16, batch=4)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")

GOALS = {
    "step_overhead_cuda_100m": 0.01,
    "step_overhead_cuda_10m": 0.03,
    "fast_rollback_p99_ms": 100.0,
    "fast_rollback_ratio": 1.2,
    "checkpoint_stall_ratio_cuda": 0.02,
    "snapshot_gpu_bytes": 0.0,
}


def test_the_cuda_figures_are_registered_with_the_issue_s_goals_for_device_cuda_only() -> None:
    discover()
    cuda = {name: spec for name, spec in registry.FIGURES.items() if spec.device == "cuda"}
    assert {name: spec.goal for name, spec in cuda.items()} == GOALS
    assert all(spec.better == "lower" for spec in cuda.values())
    assert all(spec.device == "cpu" for name, spec in registry.FIGURES.items() if name not in GOALS)


def test_the_model_sizes_are_the_ones_the_figures_name() -> None:
    from esper.tolaria.zoo import CharTransformer

    def params(size: LMSize) -> int:
        with torch.device("meta"):
            model = CharTransformer(vocab=256, width=size.width, layers=size.layers, heads=size.heads,
                                    context=size.context, dropout=0.0)
        return sum(p.numel() for p in model.parameters())

    assert 95e6 < params(LM_100M) < 105e6
    assert 9.5e6 < params(LM_10M) < 11.5e6


def _spec(name: str, device: str, calls: list[str]) -> FigureSpec:
    def fn(quick: bool) -> list[float]:
        calls.append(name)
        return [1.0]

    return FigureSpec(name=name, unit="x", goal=2.0, better="lower", fn=fn, device=device)  # type: ignore[arg-type]


def test_the_default_bench_measures_the_cpu_figures_only() -> None:
    calls: list[str] = []
    figures = {"on_cpu": _spec("on_cpu", "cpu", calls), "on_gpu": _spec("on_gpu", "cuda", calls)}
    result = run_bench(quick=True, only=None, oona_url=None, trials=1, figures=figures)
    assert calls == ["on_cpu"] and list(result["figures"]) == ["on_cpu"] and result["device"] == "cpu"
    with pytest.raises(ValueError, match=r"on_gpu \(--device cuda\) are not measured with --device cpu"):
        run_bench(quick=True, only=["on_gpu"], oona_url=None, trials=1, figures=figures)


@no_cuda
def test_device_cuda_without_cuda_is_an_error_before_anything_is_measured() -> None:
    calls: list[str] = []
    figures = {"on_gpu": _spec("on_gpu", "cuda", calls)}
    with pytest.raises(ValueError, match="--device cuda: torch .* sees no CUDA device; run the CUDA figures on a"):
        run_bench(quick=True, only=None, oona_url=None, trials=1, figures=figures, device="cuda")
    assert calls == []


@no_cuda
def test_the_cli_says_so_in_one_line_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tolaria bench: error: --device cuda: torch ") and "sees no CUDA device" in err
    assert "Traceback" not in err and err.count("\n") == 1


def _finite(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)


def test_the_step_overhead_code_runs_on_the_cpu_at_a_toy_size() -> None:
    values = measure_step_overhead("cpu", TOY, steps=4, rounds=2, warm_up=1, precision="fp32")
    assert len(values) == 2 and _finite(values) and all(v > -1.0 for v in values)


def test_the_step_overhead_code_runs_under_bf16_autocast_on_the_cpu() -> None:
    values = measure_step_overhead("cpu", TOY, steps=2, rounds=1, warm_up=1, precision="bf16")
    assert len(values) == 1 and _finite(values)


def test_the_fast_rollback_code_runs_on_the_cpu_at_a_toy_size() -> None:
    times = measure_fast_rollback("cpu", TOY, reps=3, trials=2, precision="fp32")
    assert len(times.p99_ms) == len(times.ratio) == 2
    assert _finite(times.p99_ms) and _finite(times.ratio) and min(times.ratio) > 0


def test_the_checkpoint_stall_code_runs_on_the_cpu_at_a_toy_size() -> None:
    values = measure_checkpoint_stall("cpu", TOY, trials=2, precision="fp32")
    assert len(values) == 2 and _finite(values) and min(values) >= 0.0


def test_the_snapshot_bytes_code_reads_the_cache_and_finds_none_on_a_cpu_run() -> None:
    values: list[Any] = measure_snapshot_gpu_bytes("cpu", TOY, boundaries=2, precision="fp32")
    assert values == [0.0, 0.0]


def test_each_cuda_figure_returns_the_harness_s_trials_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A figure that returns fewer values than the harness wants is called again: a whole second
    100M measurement (or, for the memoised rollback, the same values counted twice)."""
    from esper.tolaria.bench import figures_cuda
    from esper.tolaria.bench.harness import FULL_TRIALS, QUICK_TRIALS

    def fake_rollback(device: str, size: LMSize, *, reps: int, trials: int) -> figures_cuda.RollbackTimes:
        return figures_cuda.RollbackTimes([1.0] * trials, [1.0] * trials)

    monkeypatch.setattr(figures_cuda, "measure_step_overhead", lambda d, s, *, steps, rounds: [0.0] * rounds)
    monkeypatch.setattr(figures_cuda, "measure_fast_rollback", fake_rollback)
    monkeypatch.setattr(figures_cuda, "measure_checkpoint_stall", lambda d, s, *, trials: [0.0] * trials)
    monkeypatch.setattr(figures_cuda, "measure_snapshot_gpu_bytes", lambda d, s, *, boundaries: [0.0] * boundaries)
    figures_cuda._rollback_100m.cache_clear()
    discover()
    for quick, wanted in ((True, QUICK_TRIALS), (False, FULL_TRIALS)):
        for name in GOALS:
            assert len(registry.FIGURES[name].fn(quick)) >= wanted, (name, quick)
        figures_cuda._rollback_100m.cache_clear()
