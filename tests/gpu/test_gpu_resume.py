"""The digits job on `run.device = cuda`, run from the CLI as a user runs it, with a drill (a NaN
loss: fast rollback, with deferred loss reads found a step late) and killed with SIGKILL once
several epochs are checkpointed, resumes into the uninterrupted run's exact final state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
DRILL = ["--inject", "nan-loss@epoch=1,step=5"]  # `tolaria resume` has no drills: kill after it fired
KILL_AFTER = 6  # committed checkpoints (the starting state and epochs 0-4)
COMMON = ["--quiet", "--no-report", "--set", "run.device=cuda", "--set", "checkpoint.keep_last=100",
          "--set", "boundary.total_ms=1e6", "--set", "boundary.apply_ms=1e6", "--set", "boundary.check_ms=1e6",
          "--set", "boundary.tamiyo_ms=1e6", "--set", "boundary.state_assembly_ms=1e6"]


def tolaria(*args: str) -> list[str]:
    return [sys.executable, "-m", "esper.tolaria", *args]


def run_args(run_dir: Path) -> list[str]:
    return tolaria("run", str(ROOT / "examples" / "digits.toml"), "--run-dir", str(run_dir), *DRILL, *COMMON)


def finish(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def committed(run_dir: Path) -> int:
    return len(list((run_dir / "checkpoints").glob("ckpt-*")))


def test_the_digits_job_on_cuda_killed_and_resumed_ends_in_the_uninterrupted_state(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    finish(run_args(reference))
    ref = summary(reference)
    assert ref["rollbacks"], "the drill's NaN loss was not rolled back"
    assert ref["precision"]["device"].startswith("cuda")

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(run_args(run_dir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while committed(run_dir) < KILL_AFTER:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else "exited"
        assert time.monotonic() < deadline, "the run never reached its checkpoints"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists(), "the run finished before it was killed"

    finish(tolaria("resume", str(run_dir), "--quiet", "--no-report"))
    resumed = summary(run_dir)
    assert resumed["resumed_from"].startswith("ckpt-")
    assert resumed["seeds"] == ref["seeds"]
    assert resumed["final_state_sha256"] == ref["final_state_sha256"]
