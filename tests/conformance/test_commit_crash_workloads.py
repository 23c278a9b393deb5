"""(c) on every workload: a crash at each durable step of a checkpoint commit (each file write,
fsync, rename and WAL append) recovers a committed checkpoint and loses none, with the state of
a grown model (a fossilized seed, a live one) as the checkpoint's content."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from conformance.harness import Reference
from esper.tolaria.checkpoint import recover
from esper.tolaria.state.snapshot import Snapshot

WORKLOADS = ("mlp", "cnn", "lm")


def _commit_conformance() -> ModuleType:
    """The shared crash-point driver of tests/checkpoint, loaded by path (test folders are not packages)."""
    path = Path(__file__).resolve().parents[1] / "checkpoint" / "commit_conformance.py"
    spec = importlib.util.spec_from_file_location("commit_conformance_shared", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("workload", WORKLOADS)
def test_a_crash_at_every_commit_step_of_a_grown_workload_loses_no_checkpoint(
        workload: str, reference: Callable[..., Reference], tmp_path: Path) -> None:
    ref = reference(workload)
    grown = next(c for c in ref.checkpoints
                 if {s["stage"] for s in c["seeds"]} >= {"SEED_STAGE_FOSSILIZED", "SEED_STAGE_GERMINATED"})
    state = recover(ref.run_dir / "checkpoints", clean=False, name=grown["name"]).checkpoint
    assert state is not None

    def make_snapshot(step: int) -> Snapshot:
        return Snapshot(snapshot_id=f"s{step}", epoch=step // 10, global_step=step, state=state.state)

    shared = _commit_conformance()
    for case in (shared.CrashCase(before=(10, 20), step=30), shared.CrashCase(before=(10, 20, 30), step=20)):
        labels = shared.crash_at_every_step(tmp_path / f"{case.step}-{len(case.before)}", make_snapshot, case)
        for kind in ("wal-append BEGIN", "write model.pt", "fsync state.pt", "fsync-dir root", "wal-append COMMIT"):
            assert kind in labels, (kind, labels)
