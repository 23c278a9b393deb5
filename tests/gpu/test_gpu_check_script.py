"""scripts/gpu_check.sh, its CPU half: it installs the wheels it is given and the package itself into
a target folder with `pip install --no-deps`, the package is then imported from there, every step
writes its log, and the CUDA steps are skipped with a line saying so (or, without
GPU_CHECK_ALLOW_CPU, the script refuses at once)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU half; a GPU machine runs it whole")


def _wheel(folder: Path, name: str = "gpu_check_probe", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel: one module and the dist-info pip needs."""
    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    files = {
        f"{name}.py": "VALUE = 42\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def _run(out: Path, site: Path, wheels: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SITE": str(site),
               "GPU_CHECK_WHEELS": str(wheels), **env}
    environ.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=environ,
                          cwd=ROOT, timeout=300)


def test_the_cpu_half_installs_from_wheels_into_the_target_and_logs_every_step(tmp_path: Path) -> None:
    wheels, site, out = tmp_path / "wheels", tmp_path / "site", tmp_path / "out"
    wheels.mkdir()
    _wheel(wheels)
    had_build = (ROOT / "build").exists()
    proc = _run(out, site, wheels, GPU_CHECK_ALLOW_CPU="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "gpu_check_probe.py").read_text() == "VALUE = 42\n"  # the wheel, installed
    assert (site / "esper" / "tolaria" / "cli.py").is_file()  # the package, installed with --no-deps
    assert not any(p.name.startswith("torch") for p in site.iterdir())  # over the torch that is there
    log = (out / "gpu_check.log").read_text()
    assert "skipped (no CUDA): the gpu tests (make test-gpu) and tolaria bench --device cuda" in log
    assert "FAILED" not in log and log.rstrip().endswith("passed")
    install = (out / "install.log").read_text()
    assert f"esper from {site}" in install.replace(str(site.resolve()), str(site))
    assert had_build or not (ROOT / "build").exists()  # built from a copy, not in the checkout


def test_a_missing_wheel_folder_fails_the_check_naming_the_fix(tmp_path: Path) -> None:
    proc = _run(tmp_path / "out", tmp_path / "site", tmp_path / "none", GPU_CHECK_ALLOW_CPU="1")
    assert proc.returncode == 1
    assert "install: FAILED" in proc.stdout
    assert "run scripts/gpu_check.sh --fetch-wheels" in (tmp_path / "out" / "install.log").read_text()


def test_without_cuda_it_refuses_at_once_unless_the_cpu_half_is_asked_for(tmp_path: Path) -> None:
    proc = _run(tmp_path / "out", tmp_path / "site", tmp_path / "none")
    assert proc.returncode == 2
    assert "torch sees no CUDA device here: this check needs a GPU" in proc.stdout
    assert not (tmp_path / "site").exists()
