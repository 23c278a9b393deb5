"""(b) A run stopped by SIGTERM mid-epoch, or killed with SIGKILL at random steps, then resumed,
ends in the uninterrupted run's final state. Each fault is real and hits the driver's own process."""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from conformance.harness import Reference, drive, failure

WORKLOADS = ("mlp", "cnn", "lm")


def _mid_epoch_step(rng: random.Random, ref: Reference) -> int:
    """A step inside epoch 2 or 3 that is not the last of its epoch (so the SIGTERM checkpoint is mid-epoch)."""
    return rng.randrange(2, 4) * ref.steps_per_epoch + rng.randrange(1, ref.steps_per_epoch)


def _finish(workload: str, run_dir: Path, ref: Reference, workers: int) -> None:
    proc, result = drive(workload, run_dir, "--resume", "--workers", str(workers))
    assert proc.code == 0 and result is not None, failure(proc)
    assert result["resumed_from"].startswith("ckpt-"), result
    assert result["architecture"] == ref.architecture
    assert result["final_state_sha256"] == ref.final_state_sha256, "the resumed run ended in another state"


def _kill_at(workload: str, run_dir: Path, step: int, workers: int, *, resume: bool) -> None:
    args = ["--sigkill-at-step", str(step), "--workers", str(workers)] + (["--resume"] if resume else [])
    proc, result = drive(workload, run_dir, *args)
    assert proc.code == -signal.SIGKILL and result is None, failure(proc)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_sigterm_mid_epoch_then_sigkill_then_resume_gives_the_uninterrupted_final_state(
        workload: str, reference: Callable[..., Reference], tmp_path: Path) -> None:
    ref = reference(workload)
    rng = random.Random(f"kill-{workload}")
    stop_at = _mid_epoch_step(rng, ref)
    kill_at = rng.randrange(stop_at + 1, ref.total_steps)
    run_dir = tmp_path / "run"

    proc, stopped = drive(workload, run_dir, "--sigterm-at-step", str(stop_at))
    assert proc.code == 0 and stopped is not None, failure(proc)
    assert stopped["stopped"] == "SIGTERM" and stopped["global_step"] == stop_at
    _kill_at(workload, run_dir, kill_at, 0, resume=True)
    _finish(workload, run_dir, ref, 0)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("workload", WORKLOADS)
def test_repeated_sigkills_at_random_steps_then_resume_give_the_uninterrupted_final_state(
        workload: str, num_workers: int, reference: Callable[..., Reference], tmp_path: Path) -> None:
    ref = reference(workload, num_workers)
    rng = random.Random(f"kills-{workload}-{num_workers}")
    first = 2 * ref.steps_per_epoch + 1  # a checkpoint has surely been committed by then
    kills = sorted(rng.sample(range(first, ref.total_steps), 4))
    run_dir = tmp_path / "run"
    for i, step in enumerate(kills):
        _kill_at(workload, run_dir, step, num_workers, resume=i > 0)
    _finish(workload, run_dir, ref, num_workers)


@pytest.mark.slow
@pytest.mark.parametrize("workload", WORKLOADS)
def test_sigkills_at_random_moments_then_resume_give_the_uninterrupted_final_state(
        workload: str, reference: Callable[..., Reference], tmp_path: Path) -> None:
    """Kills from a timer a seeded random time after a seeded step: in a step, a boundary, an apply or a
    checkpoint write. A run that reached its end before its kill simply finished."""
    ref = reference(workload)
    rng = random.Random(f"moments-{workload}")
    run_dir = tmp_path / "run"
    for i in range(4):
        step = rng.randrange(2 * ref.steps_per_epoch + 1, ref.total_steps)
        args = ["--sigkill-at-step", str(step), "--sigkill-delay-s", f"{rng.uniform(0.001, 0.2):.3f}"]
        proc, result = drive(workload, run_dir, *args, *(["--resume"] if i else []))
        assert proc.code in (0, -signal.SIGKILL), failure(proc)
        if proc.code == 0:
            break
    _finish(workload, run_dir, ref, 0)


@pytest.mark.slow
@pytest.mark.parametrize("workload", WORKLOADS)
def test_sigterm_mid_epoch_with_two_workers_then_resume_gives_the_uninterrupted_final_state(
        workload: str, reference: Callable[..., Reference], tmp_path: Path) -> None:
    ref = reference(workload, 2)
    stop_at = _mid_epoch_step(random.Random(f"sigterm-{workload}-2"), ref)
    run_dir = tmp_path / "run"
    proc, stopped = drive(workload, run_dir, "--sigterm-at-step", str(stop_at), "--workers", "2")
    assert proc.code == 0 and stopped is not None, failure(proc)
    assert stopped["stopped"] == "SIGTERM" and stopped["global_step"] == stop_at
    _finish(workload, run_dir, ref, 2)
