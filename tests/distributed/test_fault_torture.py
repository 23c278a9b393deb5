"""Slow: random faults on random ranks at random steps of 2-rank torchrun jobs. Each job gets two
injections: a step drill (NaN loss, NaN gradient, loss spike) on one rank in epoch 1, answered in
process by every rank together, and a lost rank (killed or hung) later. No rank outlives the
collective timeout + 10 s, and `--max-restarts 1` resumes the job to the final state hash of the
same job without the lost rank."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_rank_faults import TIMEOUT_S, TimedLines, torchrun, write_config  # type: ignore[import-not-found]

pytestmark = pytest.mark.slow

JOBS = 10  # two injections each: 20 in all
STEP_DRILLS = ("nan-loss", "nan-grad", "loss-spike")
STEPS_PER_EPOCH = 20  # digits: 22 steps of 64 rows per epoch; faults land in the first 20


def plan(seed: int = 19) -> list[tuple[str, str]]:
    """(step drill, lost rank) specs, reproducible from `seed`."""
    rng = random.Random(seed)
    jobs = []
    for _ in range(JOBS):
        step = f"{rng.choice(STEP_DRILLS)}@epoch=1,step={rng.randrange(STEPS_PER_EPOCH)},rank={rng.randrange(2)}"
        lost = (f"{rng.choice(('rank-kill', 'rank-hang'))}@epoch={rng.choice((2, 3))},"
                f"step={rng.randrange(STEPS_PER_EPOCH)},rank={rng.randrange(2)}")
        jobs.append((step, lost))
    return jobs


def reference_hash(tmp_path: Path, config: Path, step_drill: str) -> str:
    run_dir = tmp_path / "ref"
    done = subprocess.run(torchrun("run", str(config), "--run-dir", str(run_dir), "--inject", step_drill),
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    return str(json.loads((run_dir / "summary.json").read_text())["final_state_sha256"])


def leave_lines(job: TimedLines, since: float) -> list[tuple[float, str]]:
    return [(at, line) for at, line in job.lines if at >= since and line.startswith("tolaria: ")
            and ("failed on rank" in line or "out of step with its peers" in line)]


@pytest.mark.parametrize("index", range(JOBS))
def test_random_faults_on_random_ranks_end_cleanly_and_resume_bit_exactly(tmp_path: Path, index: int) -> None:
    step_drill, lost = plan()[index]
    config = write_config(tmp_path, f"t{index}")
    expected = reference_hash(tmp_path, config, step_drill)
    job = TimedLines(torchrun("run", str(config), "--run-dir", str(tmp_path / "run"), "--inject", step_drill,
                              "--inject", lost, restarts=1))
    assert job.wait(400) == 0, f"{step_drill} {lost}\n" + job.text()[-6000:]
    kind, where = lost.split("@")
    fault = job.first(f"drill {kind}:")
    left = leave_lines(job, fault)
    assert left, f"{lost}: no rank said why it left\n" + job.text()[-4000:]
    assert all(at - fault <= TIMEOUT_S + 10 for at, _ in left), (lost, [(round(at - fault, 1), m) for at, m in left])
    summary: dict[str, Any] = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from"].startswith("ckpt-") and summary["ranks_final_state_match"] is True
    assert summary["final_state_sha256"] == expected, (step_drill, lost)
