"""The shipped examples, run from the CLI as a user runs them: each grows a seed to FOSSILIZED, and a
run killed with SIGKILL (at a moment chosen by the clock, not by the run) and resumed ends in the
uninterrupted run's final state; so does one stopped by SIGTERM mid-epoch and resumed.

The kill comes once a given number of epochs have been checkpointed, so it lands on a grown model:
in a step, a boundary, an apply or a checkpoint write, wherever the process happens to be."""

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

ROOT = Path(__file__).resolve().parents[2]
# example -> (overrides, the epoch after which it is killed). The examples run as shipped: a shorter
# run is another run (the cosine schedule spans run.epochs), which grows later or not at all.
EXAMPLES = {
    "digits_cnn": ([], 22),  # seed1 is fossilized at epoch 21's boundary
    "text_lm": ([], 18),
}
COMMON = ["--quiet", "--no-report", "--set", "checkpoint.keep_last=100", "--set", "boundary.total_ms=1e6",
          "--set", "boundary.apply_ms=1e6", "--set", "boundary.check_ms=1e6", "--set", "boundary.tamiyo_ms=1e6",
          "--set", "boundary.state_assembly_ms=1e6"]  # a loaded CI machine must not change the run's path


def tolaria(*args: str) -> list[str]:
    return [sys.executable, "-m", "esper.tolaria", *args]


def run_args(example: str, run_dir: Path) -> list[str]:
    overrides, _ = EXAMPLES[example]
    return tolaria("run", str(ROOT / "examples" / f"{example}.toml"), "--run-dir", str(run_dir), *overrides, *COMMON)


def finish(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def committed_epochs(run_dir: Path) -> int:
    return len(list((run_dir / "checkpoints").glob("ckpt-*")))


def start_and_signal(example: str, run_dir: Path, sig: int, after_checkpoints: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(run_args(example, run_dir), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while committed_epochs(run_dir) < after_checkpoints:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else "exited"
        assert time.monotonic() < deadline, "the run never reached its checkpoints"
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    os.kill(proc.pid, sig)
    proc.wait(timeout=120)
    return proc


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Any:
    made: dict[str, dict[str, Any]] = {}

    def get(example: str) -> dict[str, Any]:
        if example not in made:
            run_dir = tmp_path_factory.mktemp(f"example-{example}") / "run"
            finish(run_args(example, run_dir))
            made[example] = summary(run_dir)
        return made[example]

    return get


def _examples() -> list[object]:  # whole runs, minutes each on two cores: the slow suite, a longer timeout
    return [pytest.param(e, marks=[pytest.mark.slow, pytest.mark.timeout(3600)]) for e in EXAMPLES]


_slow_examples = _examples


@pytest.mark.parametrize("example", _examples())
def test_the_example_grows_a_seed_to_fossilized(example: str, references: Any) -> None:
    ref = references(example)
    stages = [s["stage"] for s in ref["seeds"].values()]
    assert "FOSSILIZED" in stages, ref["seeds"]
    assert ref["param_count"] > ref["history"][0]["param_count"], "the model grew"


@pytest.mark.parametrize("example", _examples())
def test_sigkill_then_resume_gives_the_uninterrupted_final_state(example: str, references: Any,
                                                                 tmp_path: Path) -> None:
    ref = references(example)
    run_dir = tmp_path / "run"
    _, kill_after = EXAMPLES[example]
    killed = start_and_signal(example, run_dir, signal.SIGKILL, kill_after + 1)  # +1: the starting checkpoint
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists() or summary(run_dir)["epochs_completed"] < ref["epochs_completed"]
    finish(tolaria("resume", str(run_dir), "--quiet", "--no-report"))
    resumed = summary(run_dir)
    assert resumed["resumed_from"].startswith("ckpt-")
    assert resumed["seeds"] == ref["seeds"]
    assert resumed["final_state_sha256"] == ref["final_state_sha256"]


@pytest.mark.parametrize("example", _slow_examples())
def test_sigterm_mid_epoch_then_resume_gives_the_uninterrupted_final_state(example: str, references: Any,
                                                                           tmp_path: Path) -> None:
    ref = references(example)
    run_dir = tmp_path / "run"
    stopped = start_and_signal(example, run_dir, signal.SIGTERM, 4)
    assert stopped.returncode == 0, stopped.stderr.read().decode()[-3000:] if stopped.stderr else ""
    assert summary(run_dir)["stopped"] == "SIGTERM"
    finish(tolaria("resume", str(run_dir), "--quiet", "--no-report"))
    assert summary(run_dir)["final_state_sha256"] == ref["final_state_sha256"]
