"""`--profile` on a real run: a Chrome trace with every step and boundary phase, and the report's table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer_fixtures import small_config  # type: ignore[import-not-found]

STEP = {"step.forward", "step.seed_losses", "step.backward", "step.monitors", "step.optimizer", "step.kasmina",
        "step.telemetry"}
BOUNDARY = {"boundary.validate", "boundary.state_assembly", "boundary.tamiyo", "boundary.apply", "boundary.check",
            "boundary.snapshot"}


def test_a_profiled_run_writes_a_chrome_trace_with_every_phase(make_trainer: Any, tmp_path: Path) -> None:
    trainer, _ = make_trainer(small_config(run={"epochs": 2}, profile={"enabled": True}), run_dir=tmp_path)
    trainer.fit()
    trace = json.loads((tmp_path / "trace.json").read_text())
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    names = {e["name"] for e in events}
    assert STEP | BOUNDARY <= names, sorted((STEP | BOUNDARY) - names)
    assert all(e["dur"] >= 0 and isinstance(e["ts"], (int, float)) for e in events)


def test_profiling_off_writes_no_trace(make_trainer: Any, tmp_path: Path) -> None:
    trainer, _ = make_trainer(small_config(run={"epochs": 1}), run_dir=tmp_path)
    trainer.fit()
    assert not (tmp_path / "trace.json").exists()
