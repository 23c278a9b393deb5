"""Ctrl-C on `tolaria run`: the step finishes, a checkpoint is written, the command says how to
continue and exits 130; the final lines name the summary and the report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ctrl_c_checkpoints_says_how_to_resume_and_exits_130(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "esper.tolaria", "run", str(ROOT / "examples" / "digits.toml"), "--run-dir",
           str(run_dir), "--quiet", "--no-report", "--set", "run.epochs=40", "--set", "run.threads=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list((run_dir / "checkpoints").glob("ckpt-*"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted (SIGINT)" in err and f"tolaria resume {run_dir}" in err
    assert f"summary: {run_dir / 'summary.json'}" in out


def test_a_finished_run_names_its_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "esper.tolaria", "run", str(ROOT / "examples" / "digits.toml"),
                           "--run-dir", str(run_dir), "--quiet", "--set", "run.epochs=2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"report: {run_dir / 'report' / 'index.html'}" in done.stdout and "interrupted" not in done.stderr
