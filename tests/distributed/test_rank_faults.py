"""A rank lost under torchrun: hung forever or SIGKILLed inside a step. Every rank leaves within the
collective timeout + 10 s, and `torchrun --max-restarts 1` resumes the job from rank 0's last
committed checkpoint by itself, ending with the uninterrupted run's final state hash.

Slow (about 100 s on two loaded cores: a reference run and two runs that each restart); the default
suite checks the same rules in process (test_agreement.py, test_agreement_units.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from job_toml import job_toml  # type: ignore[import-not-found]

pytestmark = pytest.mark.slow

TIMEOUT_S = 10.0
EPOCHS = 4
GROWTH = """
plateau_threshold = 1.0
shadow_epochs = 1
probation_epochs = 1
fossilize_tolerance = 10.0
cull_tolerance = 10.0
"""


def write_config(tmp_path: Path, tag: str) -> Path:
    path = tmp_path / f"{tag}.toml"
    path.write_text(job_toml(f"fault-{tag}", epochs=EPOCHS, seed=1, tamiyo=GROWTH)
                    + f"\n[distributed]\ntimeout_s = {TIMEOUT_S}\n")
    return path


def torchrun(*args: str, restarts: int = 0, ranks: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            f"--max-restarts={restarts}", "--monitor-interval=0.1", "-m", "esper.tolaria", *args, "--quiet",
            "--no-report"]


class TimedLines:
    """A process's stderr, read as it comes, each line with the moment it arrived."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def first(self, text: str) -> float:
        found = [at for at, line in self.lines if text in line]
        assert found, f"no line with {text!r} in:\n" + "\n".join(line for _, line in self.lines[-40:])
        return found[0]

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("ref")
    done = subprocess.run(torchrun("run", str(write_config(tmp, "ref")), "--run-dir", str(tmp / "run")),
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((tmp / "run" / "summary.json").read_text())  # type: ignore[no-any-return]


def _fault_then_restart(tmp_path: Path, drill: str, reference: dict[str, Any]) -> TimedLines:
    run_dir = tmp_path / "run"
    job = TimedLines(torchrun("run", str(write_config(tmp_path, "ref")), "--run-dir", str(run_dir), "--overwrite",
                              "--inject", drill, restarts=1))
    assert job.wait(400) == 0, job.text()[-6000:]
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["resumed_from"].startswith("ckpt-"), resumed["resumed_from"]
    assert resumed["epochs_completed"] == EPOCHS and resumed["ranks_final_state_match"] is True
    assert resumed["final_state_sha256"] == reference["final_state_sha256"]
    return job


def test_a_hung_rank_makes_every_rank_leave_within_the_timeout_and_the_restart_finishes_bit_exactly(
        tmp_path: Path, reference: dict[str, Any]) -> None:
    job = _fault_then_restart(tmp_path, "rank-hang@epoch=2,step=3,rank=1", reference)
    hung = job.first("drill rank-hang: hanging at epoch 2 step 3 on rank 1")
    waited = job.first("tolaria: gradient all-reduce failed on rank 0 of 2 (limit 10 s)")  # the survivor
    stuck = job.first("tolaria: rank 1: SIGTERM after")  # the hung rank, stopped by torchrun
    assert TIMEOUT_S - 1 <= waited - hung <= TIMEOUT_S + 10, job.text()
    assert stuck - hung <= TIMEOUT_S + 10, job.text()


def test_a_killed_rank_makes_the_other_leave_and_the_restart_finishes_bit_exactly(
        tmp_path: Path, reference: dict[str, Any]) -> None:
    job = _fault_then_restart(tmp_path, "rank-kill@epoch=2,step=3,rank=1", reference)
    killed = job.first("drill rank-kill: SIGKILL at epoch 2 step 3 on rank 1")
    left = next(at for at, line in job.lines if at >= killed and "failed on rank 0 of 2" in line)
    assert left - killed <= TIMEOUT_S + 10, job.text()
