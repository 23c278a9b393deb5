"""(d) A crash between a command's apply and the next checkpoint resumes into the same architecture.

The Tamiyo here behaves like a remote controller that outlives the trainer: it remembers the
epochs it answered (in a file beside the run) and answers a repeated question with a no-op. So
the command applied just before the crash reaches the resumed run only through Tolaria's own
command journal, and the resumed run must end with the uninterrupted run's seeds and weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conformance.driver import CRASH_EXIT
from conformance.harness import Reference, drive, failure
from conformance.workloads import SCRIPT

WORKLOADS = ("mlp", "cnn", "lm")


def _crash_after_apply_then_resume(workload: str, epoch: int, ref: Reference, tmp_path: Path, workers: int) -> None:
    run_dir, answered = tmp_path / "run", tmp_path / "tamiyo-answered.json"
    common = ["--answered-file", str(answered), "--workers", str(workers)]
    crashed, result = drive(workload, run_dir, "--crash-after-apply-epoch", str(epoch), *common)
    assert crashed.code == CRASH_EXIT and result is None, failure(crashed)

    resumed, result = drive(workload, run_dir, "--resume", *common)
    assert resumed.code == 0 and result is not None, failure(resumed)
    assert result["architecture"] == ref.architecture, (
        f"the command applied at epoch {epoch} before the crash was lost or doubled on resume")
    assert result["final_state_sha256"] == ref.final_state_sha256, "same architecture, but other weights"


@pytest.mark.parametrize("workload", WORKLOADS)
def test_crash_right_after_a_germination_resumes_into_the_same_architecture(
        workload: str, reference: Callable[..., Reference], tmp_path: Path) -> None:
    germinate_second = 6
    _crash_after_apply_then_resume(workload, germinate_second, reference(workload), tmp_path, 0)


def test_a_crash_in_the_first_epoch_resumes_from_the_starting_checkpoint(
        reference: Callable[..., Reference], tmp_path: Path) -> None:
    # Before the first boundary only the starting state is committed: resume from it, with epoch 0's
    # journaled command replayed.
    _crash_after_apply_then_resume("mlp", 0, reference("mlp"), tmp_path, 0)


@pytest.mark.slow
@pytest.mark.parametrize("epoch", sorted(SCRIPT))  # epoch 0 too: the starting state is checkpointed
@pytest.mark.parametrize("workload", WORKLOADS)
def test_crash_right_after_any_command_resumes_into_the_same_architecture(
        workload: str, epoch: int, reference: Callable[..., Reference], tmp_path: Path) -> None:
    _crash_after_apply_then_resume(workload, epoch, reference(workload), tmp_path, 0)


@pytest.mark.slow
@pytest.mark.parametrize("workload", WORKLOADS)
def test_crash_right_after_a_fossilization_with_two_workers_resumes_into_the_same_architecture(
        workload: str, reference: Callable[..., Reference], tmp_path: Path) -> None:
    fossilize_first = 5
    _crash_after_apply_then_resume(workload, fossilize_first, reference(workload, 2), tmp_path, 2)
