"""A run killed with SIGKILL at a random moment, or stopped by SIGTERM mid-epoch (with dropout: the
resumed run must draw the same masks), and resumed is bit-exact with an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from job_toml import job_toml  # type: ignore[import-not-found]

from esper.tolaria.observe.steplog import read_step_log

CULLING = """
plateau_threshold = 1.0
cull_tolerance = 0.0   # a seed that costs any validation loss is culled: the run germinates and culls
"""


def dropout_job(name: str, *, epochs: int, seed: int) -> str:
    """The test job with dropout: a resume must reproduce the random masks, not only the weights."""
    return job_toml(name, epochs=epochs, seed=seed, tamiyo=CULLING).replace("hidden = [8]\n",
                                                                           "hidden = [8]\ndropout = 0.1\n")


def tolaria(*args: str) -> list[str]:
    return [sys.executable, "-m", "esper.tolaria", *args, "--quiet", "--no-report"]


def checkpoints_on_disk(run_dir: Path) -> int:
    """Checkpoint folders in place (cheap to poll; the kill moment only needs to be near one)."""
    return len(list((run_dir / "checkpoints").glob("ckpt-*")))


def test_sigkill_at_a_random_moment_then_resume_is_bit_exact(tmp_path: Path) -> None:
    rng = random.Random(os.getpid())
    for tag in ("ref", "victim"):
        (tmp_path / f"{tag}.toml").write_text(job_toml(f"resume-{tag}", epochs=12, seed=3, tamiyo=CULLING))
    ref_dir, victim_dir = tmp_path / "ref", tmp_path / "victim"
    subprocess.run(tolaria("run", str(tmp_path / "ref.toml"), "--run-dir", str(ref_dir)), check=True, timeout=300)

    victim = subprocess.Popen(tolaria("run", str(tmp_path / "victim.toml"), "--run-dir", str(victim_dir)))
    wanted = rng.randint(2, 3)  # keep_last = 3: at most three folders at once
    deadline = time.monotonic() + 240
    while checkpoints_on_disk(victim_dir) < wanted and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.5))
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    resumed_run = subprocess.run(tolaria("resume", str(victim_dir)), capture_output=True, text=True, timeout=300)
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]

    ref = json.loads((ref_dir / "summary.json").read_text())
    resumed = json.loads((victim_dir / "summary.json").read_text())
    assert resumed["resumed_from"].startswith("ckpt-")
    assert read_step_log(victim_dir / "steps.csv") == read_step_log(ref_dir / "steps.csv")
    assert resumed["final_state_sha256"] == ref["final_state_sha256"]
    stages = {h["stage"] for s in ref["seeds"].values() for h in s["stage_history"]}
    assert {"GERMINATED", "CULLED"} <= stages, "the run must cross a germination and a cull"


def test_sigterm_finishes_the_step_checkpoints_mid_epoch_and_resume_is_bit_exact(tmp_path: Path) -> None:
    for tag in ("ref", "term"):
        (tmp_path / f"{tag}.toml").write_text(dropout_job(f"term-{tag}", epochs=8, seed=5))
    ref_dir, term_dir = tmp_path / "ref", tmp_path / "term"
    subprocess.run(tolaria("run", str(tmp_path / "ref.toml"), "--run-dir", str(ref_dir)), check=True, timeout=300)
    run = subprocess.Popen(tolaria("run", str(tmp_path / "term.toml"), "--run-dir", str(term_dir)))
    deadline = time.monotonic() + 240
    while checkpoints_on_disk(term_dir) < 2 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    assert run.wait(60) == 0, "SIGTERM must end the run cleanly"
    stopped = json.loads((term_dir / "summary.json").read_text())
    assert stopped["stopped"] == "SIGTERM" and stopped["epochs_completed"] < 8
    last = stopped["safety"]["checkpoints"][-1]
    assert last["reason"] == "stopped by SIGTERM" and last["step"] == stopped["global_step"]
    resumed_run = subprocess.run(tolaria("resume", str(term_dir)), capture_output=True, text=True, timeout=300)
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]
    resumed = json.loads((term_dir / "summary.json").read_text())
    assert read_step_log(term_dir / "steps.csv") == read_step_log(ref_dir / "steps.csv")
    assert resumed["final_state_sha256"] == json.loads((ref_dir / "summary.json").read_text())["final_state_sha256"]
