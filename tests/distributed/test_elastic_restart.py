"""What a restarted torchrun attempt does with its run directory (`job._elastic_attempt`), in one
process with torchrun's environment variables set: the decision is rank 0's, broadcast, so one
process exercises all of it. The restart of `tolaria resume RUN --into BRANCH` must go on in
BRANCH, not start the branch again into a directory its first attempt already filled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from trainer_fixtures import small_config  # type: ignore[import-not-found]

from esper.tolaria.job import ELASTIC_MARK, resume_job, run_job

EPOCHS = 2


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-epoch run with a checkpoint per epoch, made outside torchrun."""
    run_dir = tmp_path_factory.mktemp("origin") / "run"
    config = small_config(run={"epochs": EPOCHS}, checkpoint={"enabled": True, "every_epochs": 1, "keep_last": 3},
                          telemetry={"jsonl": False, "step_log": False})
    run_job(config, run_dir, progress=False, report=False)
    return run_dir


def _attempt(monkeypatch: pytest.MonkeyPatch, attempt: int) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-r1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))


def test_a_restarted_resume_into_a_branch_continues_from_the_branchs_own_checkpoints(
        origin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    branch = tmp_path / "branch"
    _attempt(monkeypatch, 0)
    first = resume_job(origin, epochs=EPOCHS + 1, progress=False, report=False, into=branch)
    assert json.loads((branch / ELASTIC_MARK).read_text())["torchelastic_run_id"] == "job-r1"
    _attempt(monkeypatch, 1)  # the same command, restarted by torchrun after the first attempt's end
    again = resume_job(origin, epochs=EPOCHS + 1, progress=False, report=False, into=branch)
    newest = sorted(p.name for p in (branch / "checkpoints").glob("ckpt-*"))[-1]
    assert again["resumed_from"] == newest, "the restart must continue the branch, not the origin"
    assert again["final_state_sha256"] == first["final_state_sha256"]


def test_a_restarted_branch_with_nothing_committed_starts_again_from_the_origin(
        origin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    branch = tmp_path / "branch"
    _attempt(monkeypatch, 0)
    first = resume_job(origin, epochs=EPOCHS + 1, progress=False, report=False, into=branch)
    shutil.rmtree(branch / "checkpoints")  # as if the first attempt died before its first checkpoint
    _attempt(monkeypatch, 1)
    again = resume_job(origin, epochs=EPOCHS + 1, progress=False, report=False, into=branch)
    assert again["resumed_from"] == first["resumed_from"] and again["resumed_from"].startswith("ckpt-")
    assert again["final_state_sha256"] == first["final_state_sha256"]


def test_a_restart_never_overwrites_the_run_it_resumes_within(tmp_path: Path) -> None:
    from esper.tolaria.job import ResumePoint, _restarted

    own = ResumePoint(tmp_path / "checkpoints", "ckpt-000000000010")
    assert _restarted("overwrite", tmp_path, True, False) == (True, False)
    assert _restarted("overwrite", tmp_path, own, False) == (own, False)
    assert _restarted("overwrite", tmp_path, False, False) == (False, True)
    assert _restarted("resume", tmp_path, own, False) == (True, False)
    assert _restarted(None, tmp_path, own, False) == (own, False)
