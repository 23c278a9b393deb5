"""(a) Every retained checkpoint of a run restores into a fresh trainer and continues exactly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conformance.harness import Reference, StopAfterBoundaries, branch, resume_at
from conformance.workloads import EPOCHS, build_trainer

WORKLOADS = ("mlp", "cnn", "lm")
LIFECYCLE = {"GERMINATED", "TRAINING", "BLENDING", "SHADOWING", "PROBATIONARY", "FOSSILIZED", "CULLED"}


def _continue_from_each_checkpoint(ref: Reference, tmp_path: Path, epochs: int | None) -> None:
    """Resume from every checkpoint; `epochs` boundaries later (None: at the end) the state must match."""
    assert LIFECYCLE <= ref.stages, f"the {ref.workload} run must cross the whole lifecycle, got {sorted(ref.stages)}"
    assert len(ref.checkpoints) == EPOCHS + 1, f"expected the start and one checkpoint per epoch: {ref.checkpoints}"
    mismatches = []
    for checkpoint in ref.checkpoints:
        stop = StopAfterBoundaries(epochs if epochs is not None else EPOCHS + 1)
        run_dir = tmp_path / checkpoint["name"]
        branch(ref.run_dir / "checkpoints", checkpoint, run_dir)
        trainer = build_trainer(ref.workload, run_dir, num_workers=ref.num_workers, callbacks=[stop])
        try:
            resume_at(trainer, run_dir, checkpoint)
        except Exception as exc:  # noqa: BLE001 - report every checkpoint, not only the first failure
            trainer.close()
            mismatches.append(f"{checkpoint['name']} (epoch {checkpoint['epoch']}): restore failed: "
                              f"{type(exc).__name__}: {exc}")
            continue
        assert trainer.resumed_from == checkpoint["name"]
        trainer.fit()
        for step, digest in stop.by_step.items():
            if ref.boundary_hashes.get(step) != digest:
                mismatches.append(f"{checkpoint['name']}: state after step {step} differs from the uninterrupted run")
                break
        if epochs is None and trainer.final_state_sha256() != ref.final_state_sha256:
            mismatches.append(f"{checkpoint['name']}: final state differs from the uninterrupted run")
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_checkpoint_restores_and_its_next_epoch_matches_the_uninterrupted_run(
        workload: str, reference: Callable[..., Reference], tmp_path: Path) -> None:
    _continue_from_each_checkpoint(reference(workload), tmp_path, epochs=1)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_checkpoint_restores_and_continues_to_the_uninterrupted_final_state(
        workload: str, num_workers: int, reference: Callable[..., Reference], tmp_path: Path) -> None:
    _continue_from_each_checkpoint(reference(workload, num_workers), tmp_path, epochs=None)
