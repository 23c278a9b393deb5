"""`tolaria report RUN RUN`: growth against the host alone on one page, with seed events marked,
best epochs, every resume, and the config keys that differ."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_fixtures import FAST_GROWTH, MemoryBus, StopAfter, small_config  # type: ignore[import-not-found]

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



@pytest.fixture(scope="module")
def resumed_twice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run stopped after epoch 1, resumed and stopped after epoch 2, then resumed to its end."""
    run_dir = tmp_path_factory.mktemp("runs") / "resumed"
    for attempt, stop in enumerate((1, 2, None)):
        cfg = small_config(**CALM, run={"epochs": 5}, checkpoint={"enabled": True}, telemetry={"jsonl": True},
                           loggers={"csv": {"enabled": False}})
        callbacks = (StopAfter(stop),) if stop is not None else ()
        trainer = build_trainer(cfg, run_dir=run_dir, callbacks=callbacks)
        try:
            if attempt:
                trainer.resume_from(run_dir / "checkpoints")
            trainer.fit()
        finally:
            trainer.close()
    return run_dir


def _cells(page: str, run: str) -> dict[str, str]:
    """The comparison table's row for `run`, as {column: cell text}."""
    rows = [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", r) for r in re.findall(r"<tr>(.*?)</tr>", page)]
    head = next(r for r in rows if r and r[0] == "run")
    return dict(zip(head, next(r for r in rows if r and r[0] == run), strict=True))


def test_the_comparison_names_every_resume_of_each_run(resumed_twice: Path, two_runs: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    page = compare_runs([resumed_twice, two_runs[1]], tmp_path / "cmp").read_text()
    markers = [json.loads(line) for line in (resumed_twice / "telemetry.jsonl").read_text().splitlines()
               if '"run_started"' in line]
    checkpoints = [e["attributes"]["resumed_from"] for m in markers for e in m["payload"]["events"]
                   if e["description"] == "run_started" and e["attributes"]["resumed_from"]]
    assert len(checkpoints) == 2 and checkpoints[-1] == json.loads((resumed_twice / "summary.json").read_text())[
        "resumed_from"], "two resumes; the summary keeps only the last"
    resumed = _cells(page, "resumed")["resumed"]
    assert resumed.startswith("yes, 2× (at epoch 2 (step "), resumed
    assert f"from {checkpoints[0]}), at epoch 3 (step " in resumed and resumed.endswith(f"from {checkpoints[1]}))")
    assert _cells(page, "host-alone")["resumed"] == "no"


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
