"""`tolaria report RUN RUN`: growth against the host alone on one page, with seed events marked,
best epochs, and the config keys that differ."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_fixtures import FAST_GROWTH, MemoryBus, small_config  # type: ignore[import-not-found]

from esper.tolaria.loop.build import build_trainer
from esper.tolaria.observe.compare import compare_runs

CALM = {"boundary": {"state_assembly_ms": 1e4, "tamiyo_ms": 1e4, "apply_ms": 1e4, "check_ms": 1e4,
                     "total_ms": 1e5}, "handshake": {"tamiyo_timeout_s": 30.0}}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    made = []
    for name, growth in (("grown", True), ("host-alone", False)):
        run_dir = tmp_path_factory.mktemp("runs") / name
        cfg = small_config(**CALM, **FAST_GROWTH, run={"epochs": 5, "morphogenesis": growth},
                           telemetry={"jsonl": True})
        trainer = build_trainer(cfg, bus=MemoryBus(), run_dir=run_dir)
        try:
            trainer.fit()
        finally:
            trainer.close()
        made.append(run_dir)
    return made[0], made[1]


def test_the_comparison_overlays_both_runs_and_tabulates_them(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    grown, alone = two_runs
    page = compare_runs([grown, alone], tmp_path / "cmp").read_text()
    assert page.count("data:image/png;base64,") == 4, "metric, validation and training loss, parameters"
    rows = re.findall(r"<tr>(.*?)</tr>", page)
    runs = [r for r in rows if "<td>grown</td>" in r or "<td>host-alone</td>" in r]
    assert len(runs) == 2
    assert "best accuracy" in page and "best epoch" in page and "seeds (fossilized)" in page
    differing = [r for r in rows if "run.morphogenesis" in r]
    assert differing and "True" in differing[0] and "False" in differing[0], "the config key that differs"
    assert not any("run.epochs" in r for r in rows), "keys the runs share are not listed"
    grown_row = next(r for r in runs if "<td>grown</td>" in r)
    alone_row = next(r for r in runs if "<td>host-alone</td>" in r)
    assert "<td>0 (0)</td>" in alone_row and "<td>0 (0)</td>" not in grown_row, "the grown run's seeds"


def test_the_cli_writes_a_comparison_for_several_runs(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    grown, alone = two_runs
    out = tmp_path / "page"
    done = subprocess.run([sys.executable, "-m", "esper.tolaria", "report", str(grown), str(alone), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"comparison: {out / 'index.html'}" in done.stdout and (out / "index.html").is_file()
    missing = subprocess.run([sys.executable, "-m", "esper.tolaria", "report", str(grown), str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "summary.json not found" in missing.stderr
    assert "Traceback" not in missing.stderr
