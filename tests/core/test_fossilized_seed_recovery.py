"""A run that fossilizes a seed stays recoverable: every checkpoint restores and continues, and a
fast rollback crosses the fossilization in both directions (frozen parameters leave the
optimizer by name; the restored structure gets its own optimizer, momentum included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer_fixtures import small_config  # type: ignore[import-not-found]

from esper.tolaria.checkpoint.recovery import LoadedCheckpoint, committed_index, verify_and_load
from esper.tolaria.checkpoint.wal import replay
from esper.tolaria.drills import FaultPlan
from esper.tolaria.state.snapshot import Snapshot, state_checksum

CALM = {"boundary": {"state_assembly_ms": 1e4, "tamiyo_ms": 1e4, "apply_ms": 1e4, "check_ms": 1e4,
                     "total_ms": 1e5}, "handshake": {"tamiyo_timeout_s": 30.0}}
FOSSILIZED = "SEED_STAGE_FOSSILIZED"


def _stages(state: dict[str, Any]) -> set[str]:
    return {s["stage"] for s in state["kasmina"]["manifest"]["seeds"]}


def _optimizer_holds_exactly_the_trainable_parameters(t: Any) -> bool:
    held = {n for g in t.optim.optimizer.param_groups for n in g["param_names"]}
    return held == {n for n, p in t.model.named_parameters() if p.requires_grad}


def _same_sections(t: Any, snapshot_state: dict[str, Any]) -> None:
    live = t.registry.capture()
    for key in ("model", "optimizer", "kasmina", "lr"):
        assert state_checksum(live[key]) == state_checksum(snapshot_state[key]), key


def _checkpoints(directory: Path) -> list[LoadedCheckpoint]:
    out = []
    for entry in sorted(committed_index(replay(directory).records), key=lambda e: e.txn_id):
        loaded = verify_and_load(directory / entry.name, entry)
        assert isinstance(loaded, LoadedCheckpoint), loaded
        out.append(loaded)
    return out


class EveryCheckpointDurable:
    """Waits for each epoch's checkpoint (the store lets a newer one supersede a queued one)."""

    def on_boundary_end(self, t: Any, epoch: int, report: Any) -> None:
        assert t.checkpoints.store.flush(timeout=60)


def test_every_checkpoint_of_a_run_that_fossilizes_restores_and_continues(make_trainer: Any, tmp_path: Path) -> None:
    config = small_config(**CALM, run={"epochs": 8}, checkpoint={"enabled": True, "keep_last": 100})
    run, _ = make_trainer(config, run_dir=tmp_path / "run")
    run.callbacks.append(EveryCheckpointDurable())
    final = run.fit().summary["final_state_sha256"]
    run.close()
    checkpoints = _checkpoints(tmp_path / "run" / "checkpoints")
    assert len(checkpoints) == 9 and FOSSILIZED in _stages(checkpoints[-1].state)  # the start and 8 epochs

    restorer, _ = make_trainer(small_config(**CALM, run={"epochs": 8}))
    for checkpoint in checkpoints:  # in order: into and across every structure the run had
        restorer.registry.restore(checkpoint.state, rewind=False)
        assert _optimizer_holds_exactly_the_trainable_parameters(restorer), checkpoint.name
        _same_sections(restorer, checkpoint.state)

    first_fossil = next(c for c in checkpoints if FOSSILIZED in _stages(c.state))
    resumed, _ = make_trainer(small_config(**CALM, run={"epochs": 8}))
    resumed.registry.restore(first_fossil.state, rewind=False)
    assert resumed.fit().summary["final_state_sha256"] == final  # continues exactly


def test_a_fast_rollback_crosses_a_fossilization_in_both_directions(make_trainer: Any) -> None:
    config = small_config(**CALM, run={"epochs": 9})
    reference, _ = make_trainer(config)
    final = reference.fit().summary["final_state_sha256"]
    trainer, _ = make_trainer(config)
    seen: dict[str, Snapshot] = {}
    restores: list[str] = []

    class CrossTheFossilization:
        def on_boundary_end(self, t: Any, epoch: int, report: Any) -> None:
            now = t.safety.snapshots.cache.get(t.safety.snapshots._unproven)
            stages = _stages(now.state)
            if FOSSILIZED not in stages:
                seen["before"] = now
            elif "after" not in seen:
                seen["after"] = now
            elif "SEED_STAGE_GERMINATED" in stages and not restores:
                # The optimizer was rebuilt since (a germination): no snapshot's copy plan applies.
                for target in (seen["after"], seen["before"], seen["after"], now):
                    outcome = t.safety.coordinator.rollback(target, "fast")
                    assert outcome.succeeded, outcome.reason
                    restores.append(t.safety.coordinator.participants[1].last_restore)
                    assert _optimizer_holds_exactly_the_trainable_parameters(t)
                    _same_sections(t, target.state)

    trainer.callbacks.append(CrossTheFossilization())
    summary = trainer.fit().summary
    assert restores[:3] == ["rebuilt"] * 3, restores
    assert summary["final_state_sha256"] == final  # back at `now`, training went on as if nothing happened


def test_a_major_full_rollback_to_a_checkpoint_taken_after_a_fossilization_succeeds(
        make_trainer: Any, tmp_path: Path) -> None:
    # Epoch 6 fossilizes seed1, epoch 7 germinates seed2 (an optimizer rebuild) and then collapses.
    config = small_config(**CALM, run={"epochs": 9}, checkpoint={"enabled": True},
                          emergency={"spike_lr_factor": 1.0, "watchdog_s": 30.0})
    trainer, _ = make_trainer(config, faults=FaultPlan.parse(["accuracy-collapse@epoch=7"]), run_dir=tmp_path)
    s = trainer.fit().summary
    assert s["seeds"]["seed1"]["stage_history"][-1]["epoch"] < 7
    major = s["emergencies"][0]
    assert (major["level"], major["kind"], major["ok"]) == ("major", "accuracy_collapse", True), major
    assert s["rollbacks"][0]["tier"] == "full" and s["rollbacks"][0]["succeeded"]
    assert s["epochs_completed"] == 9 and not s.get("stopped")
