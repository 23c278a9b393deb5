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
    proc = subprocess.run([sys.executable, "-m", "pytest", "-rs", "-p", "no:randomly", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip rule of a machine without CUDA")
def test_the_default_suite_collects_the_gpu_tests_and_without_cuda_skips_them_saying_why() -> None:
    default = set(re.findall(r"^(tests/gpu/\S+::\S+)$", _pytest("tests/gpu", "-q", "--collect-only"), re.MULTILINE))
    out = _pytest("tests/gpu", "-v", "-m", "gpu")
    ran = dict(re.findall(r"^(tests/gpu/\S+::\S+) (\w+)", out, re.MULTILINE))
    assert len(ran) >= 4 and set(ran) < default  # collected by default; -m gpu selects only them
    assert set(ran.values()) == {"SKIPPED"}, out
    assert not any("test_gpu_marker" in t or "test_gpu_check_script" in t for t in ran)
    reasons = re.findall(r"^SKIPPED \[(\d+)\] \S+: (.*)$", out, flags=re.MULTILINE)
    assert {reason for _, reason in reasons} == {"needs CUDA"}
    assert sum(int(n) for n, _ in reasons) == len(ran)
