"""The `gpu` marker: every CUDA test is collected by the default suite, and skipped, with the reason
"needs CUDA", where torch sees no CUDA device; `-m gpu` selects exactly them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _pytest(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:randomly", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip rule of a machine without CUDA")
def test_gpu_tests_are_collected_by_the_default_suite_and_skipped_without_cuda() -> None:
    out = _pytest("tests/gpu", "--deselect", "tests/gpu/test_gpu_marker.py")
    skipped = re.findall(r"^SKIPPED \[(\d+)\] (\S+): (.*)$", out, flags=re.MULTILINE)
    assert skipped, out
    assert {reason for _, _, reason in skipped} == {"needs CUDA"}
    counted = int(re.search(r"(\d+) skipped", out).group(1))  # type: ignore[union-attr]
    assert counted == sum(int(n) for n, _, _ in skipped) >= 4
    assert " passed" not in out and " failed" not in out


def test_the_gpu_marker_selects_only_gpu_tests() -> None:
    out = _pytest("tests/gpu", "-m", "gpu", "--collect-only")
    ids = [line for line in out.splitlines() if "::" in line]
    assert ids and not any("test_gpu_marker" in line for line in ids)
    assert re.search(r"\d+ deselected", out)  # this module's own tests are not gpu tests
