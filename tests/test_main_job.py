"""The main job end to end through the CLI: growth beats the bare host, and the run directory is complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esper.tolaria.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("digits")
    config = str(ROOT / "examples" / "digits.toml")
    assert main(["run", config, "--run-dir", str(base / "grown"), "--quiet"]) == 0
    assert main(["run", config, "--run-dir", str(base / "host"), "--quiet", "--no-morphogenesis",
                 "--no-report"]) == 0
    return {"grown": base / "grown", "host": base / "host"}


def test_the_grown_digits_run_beats_the_same_host_without_growth_by_3_points(runs: dict[str, Path]) -> None:
    grown = json.loads((runs["grown"] / "summary.json").read_text())
    host = json.loads((runs["host"] / "summary.json").read_text())
    assert grown["epochs_completed"] == host["epochs_completed"] == 40
    assert any(s["stage"] == "FOSSILIZED" for s in grown["seeds"].values())
    assert grown["final_val_accuracy"] >= host["final_val_accuracy"] + 0.03, \
        (grown["final_val_accuracy"], host["final_val_accuracy"])
    assert grown["param_count"] > host["param_count"]


def test_the_run_directory_holds_summary_telemetry_checkpoints_and_report(runs: dict[str, Path]) -> None:
    run = runs["grown"]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("epochs_completed", "final_val_accuracy", "seeds", "history", "boundary_ms", "conservative_mode",
                "telemetry", "final_state_sha256", "rollbacks", "emergencies"):
        assert key in summary, key
    assert {"p50", "p99", "max"} <= set(summary["boundary_ms"]["total"])
    assert summary["telemetry"]["published"] > 0 and summary["telemetry"]["dropped"] == 0
    lines = (run / "telemetry.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["stream"] for line in lines)
    assert (run / "report" / "index.html").stat().st_size > 1000
    assert all((run / "report" / f"{name}.png").stat().st_size > 1000 for name in ("loss", "accuracy", "seeds"))


def test_inspect_lists_verified_checkpoints(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(runs["grown"]), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["checkpoints"] and all(c["status"] == "ok" for c in listing["checkpoints"])
    assert any(c["seeds"] for c in listing["checkpoints"])


def test_cli_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(ROOT / "examples" / "digits.toml"), "--inject", "tamiyo-dance@epoch=1"]) == 2
    assert "unknown drill 'tamiyo-dance'" in capsys.readouterr().err
    assert main(["resume", str(tmp_path)]) == 2
    assert "a run directory written by `tolaria run`" in capsys.readouterr().err
    assert main(["drills"]) == 0
    assert "tamiyo-hang" in capsys.readouterr().out
