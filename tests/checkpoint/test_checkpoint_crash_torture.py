"""SIGKILL a saving child at random moments; recovery must find every reported commit intact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "crash_torture.py"


def _torture(tmp_path: Path, kills: int, seed: int, max_delay_ms: float = 30.0) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--kills", str(kills), "--seed", str(seed), "--dir", str(tmp_path),
         "--max-delay-ms", str(max_delay_ms)],
        capture_output=True, text=True, timeout=600,
    )
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, (report, proc.stderr[-2000:])
    return report


def test_a_few_random_kills_lose_no_commit(tmp_path: Path) -> None:
    report = _torture(tmp_path, kills=12, seed=1, max_delay_ms=200)  # a busy disk: a save can take 100 ms
    assert report["failures"] == [] and report["commits_reported"] > 0


@pytest.mark.slow
def test_two_hundred_random_kills_lose_no_commit_and_corrupt_nothing(tmp_path: Path) -> None:
    report = _torture(tmp_path, kills=200, seed=0)
    assert report["kills"] == 200 and report["failures"] == []
    assert report["commits_reported"] >= 100  # kills landed among real saves, not only at startup
