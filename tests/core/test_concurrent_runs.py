"""Two runs of one config on one machine (a sweep) both finish: per-run resources are keyed by the
run, never by the config's name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits.toml"


def test_two_concurrent_runs_of_the_same_config_both_finish(tmp_path: Path) -> None:
    runs = [tmp_path / "a", tmp_path / "b"]
    procs = [subprocess.Popen([sys.executable, "-m", "esper.tolaria", "run", str(EXAMPLE), "--run-dir", str(run),
                               "--epochs", "3", "--quiet", "--no-report"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for run in runs]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for proc, out, run in zip(procs, outputs, runs, strict=True):
        assert proc.returncode == 0, out
        assert "Traceback" not in out, out
        assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 3
