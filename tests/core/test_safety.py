"""Faults injected into a real run: the level chosen, the action taken, escalation, and recovery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer_fixtures import small_config  # type: ignore[import-not-found]

from esper.tolaria.checkpoint import inspect
from esper.tolaria.drills import FaultPlan
from esper.tolaria.state.snapshot import state_checksum

# Budgets far above the work, so that machine noise never changes a run's decisions.
CALM = {"boundary": {"state_assembly_ms": 1e4, "tamiyo_ms": 1e4, "apply_ms": 1e4, "check_ms": 1e4,
                     "total_ms": 1e5}, "handshake": {"tamiyo_timeout_s": 30.0}}


def run(make_trainer: Any, drills: list[str], tmp_path: Path | None = None, epochs: int = 6,
        **sections: Any) -> dict[str, Any]:
    cfg = {**CALM, "run": {"epochs": epochs}, "emergency": {"spike_lr_factor": 1.0, "watchdog_s": 30.0}}
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    if tmp_path is not None:
        cfg["checkpoint"] = {"enabled": True, "every_epochs": 1}
    trainer, _ = make_trainer(small_config(**cfg), faults=FaultPlan.parse(drills), run_dir=tmp_path)
    return trainer.fit().summary


def test_nan_loss_is_severe_and_fast_rolls_back_then_training_resumes(make_trainer: Any) -> None:
    s = run(make_trainer, ["nan-loss@epoch=2,step=3"])
    first = s["emergencies"][0]
    assert (first["level"], first["kind"], first["action"], first["ok"]) == (
        "severe", "loss_nonfinite", "fast rollback", True)
    rollback = s["rollbacks"][0]
    assert rollback["tier"] == "fast" and rollback["succeeded"] and rollback["target_epoch"] <= 2
    assert rollback["restore"] == "rebuilt"  # the last healthy snapshot predates a germination
    assert set(rollback["phase_ms"]) == {"prepare", "commit", "confirm"}
    assert s["epochs_completed"] == 6 and "skipping batch 3 of epoch 2" in s["drills"][0]["outcome"]


def test_a_rollback_within_one_structure_uses_the_snapshots_copy_plan_and_is_exact(make_trainer: Any) -> None:
    cfg = {**CALM, "run": {"epochs": 4, "morphogenesis": False}}
    trainer, _ = make_trainer(small_config(**cfg))
    checks: list[str] = []

    class RollBackOnce:
        def on_boundary_end(self, t: Any, epoch: int, report: Any) -> None:
            target = t.safety.snapshots.cache.last_healthy()
            if target is None or target.global_step == 0 or checks:  # step 0: no optimizer state yet
                return
            outcome = t.safety.coordinator.rollback(target, "fast")
            assert outcome.succeeded, outcome.reason
            checks.append(t.safety.coordinator.participants[1].last_restore)
            assert state_checksum(t.registry.capture()["model"]) == state_checksum(target.state["model"])
            assert state_checksum(t.registry.capture()["optimizer"]) == state_checksum(target.state["optimizer"])

    trainer.callbacks.append(RollBackOnce())
    trainer.fit()
    assert checks == ["planned copy"]


def test_nan_gradient_under_a_finite_loss_is_severe(make_trainer: Any) -> None:
    checked = run(make_trainer, ["nan-grad@epoch=1,step=2"], emergency={"grad_check_every": 1})
    assert checked["emergencies"][0]["kind"] == "grad_nonfinite" and checked["rollbacks"][0]["succeeded"]
    assert checked["epochs_completed"] == 6
    # Not a check step: the optimizer makes the weights NaN, the next step's loss shows it, and the
    # rollback replays the unchecked steps with checks (the one-shot drill does not fire again).
    late = run(make_trainer, ["nan-grad@epoch=1,step=2"], emergency={"grad_check_every": 1000})
    first = late["emergencies"][0]
    assert (first["level"], first["kind"]) == ("severe", "loss_nonfinite")
    assert "replaying them with gradient checks" in first["reason"]
    assert late["rollbacks"][0]["succeeded"] and late["epochs_completed"] == 6
    assert late["history"][-1]["train_loss"] == late["history"][-1]["train_loss"]  # finite: not NaN


def test_a_batch_whose_gradient_is_always_nan_is_found_on_the_replay_and_skipped(make_trainer: Any) -> None:
    """A data-driven NaN gradient on an unchecked step: caught one step late through the loss, then
    the checked replay names the batch, and the run equals one that never saw it."""
    from esper.tolaria.drills import _NaNGradient

    bad = (2, 5)
    cfg = {**CALM, "run": {"epochs": 5}, "telemetry": {"step_interval": 0},
           "emergency": {"spike_lr_factor": 1.0, "watchdog_s": 30.0, "grad_check_every": 1000}}
    trainer, _ = make_trainer(small_config(**cfg))
    plain_loss = trainer.task.criterion  # the task's cross-entropy on (prediction, target)

    def poisoned(out: Any, y: Any) -> Any:
        loss = plain_loss(out, y)
        if trainer.model.training and (trainer.state.epoch, trainer.batches.sampler.last_index) == bad:
            return loss + _NaNGradient.apply(next(trainer.model.parameters()))
        return loss

    trainer.task.loss_fn = poisoned
    recovered = trainer.fit().summary
    kinds = [e["kind"] for e in recovered["emergencies"]]
    assert kinds == ["loss_nonfinite", "grad_nonfinite"], recovered["emergencies"]
    assert trainer.batches.sampler.skipped == {bad}
    reference, _ = make_trainer(small_config(**cfg))
    reference.batches.sampler.skipped.add(bad)
    clean = reference.fit().summary
    assert [h["train_loss"] for h in recovered["history"]] == [h["train_loss"] for h in clean["history"]]
    assert recovered["final_state_sha256"] == clean["final_state_sha256"]


def test_a_fault_that_recurs_after_every_rollback_escalates_instead_of_looping(make_trainer: Any) -> None:
    cfg = {**CALM, "run": {"epochs": 5}, "emergency": {"watchdog_s": 30.0, "max_rollbacks_without_progress": 3}}
    trainer, _ = make_trainer(small_config(**cfg))
    plain_loss = trainer.task.criterion  # the task's cross-entropy on (prediction, target)

    def broken_from_epoch_2(out: Any, y: Any) -> Any:  # every batch, whatever is skipped or restored
        loss = plain_loss(out, y)
        return loss * float("nan") if trainer.model.training and trainer.state.epoch >= 2 else loss

    trainer.task.loss_fn = broken_from_epoch_2
    s = trainer.fit().summary
    assert len(s["rollbacks"]) == 3 and all(r["succeeded"] for r in s["rollbacks"])
    levels = [(e["level"], e["ok"]) for e in s["emergencies"]]
    assert levels[:3] == [("severe", True)] * 3
    assert ("severe", False) in levels and ("major", False) in levels and ("critical", True) in levels
    assert "fault recurs" in " ".join(e.get("detail", "") + e.get("reason", "") for e in s["emergencies"])
    assert s["stopped"].startswith("halted") and s["epochs_completed"] == 2
    # Each rollback skipped one more batch: earlier skips survive a rollback to the same snapshot.
    assert trainer.batches.sampler.skipped == {(2, 0), (2, 1), (2, 2)}


def test_a_x20_loss_spike_is_severe(make_trainer: Any) -> None:
    s = run(make_trainer, ["loss-spike@epoch=4,step=1"])
    assert s["emergencies"][0]["kind"] == "loss_spike" and s["emergencies"][0]["level"] == "severe"
    assert s["rollbacks"][0]["tier"] == "fast"


def test_accuracy_collapse_is_major_and_restores_from_disk(make_trainer: Any, tmp_path: Path) -> None:
    s = run(make_trainer, ["accuracy-collapse@epoch=3"], tmp_path)
    major = s["emergencies"][0]
    assert (major["level"], major["kind"], major["action"]) == ("major", "accuracy_collapse",
                                                                "full rollback + checkpoint")
    assert s["rollbacks"][0]["tier"] == "full" and s["rollbacks"][0]["succeeded"]
    assert s["epochs_completed"] == 6 and s["final_val_accuracy"] > 0.3


def test_a_hung_step_is_critical_then_training_resumes(make_trainer: Any) -> None:
    s = run(make_trainer, ["hang-step@epoch=1,step=1"], emergency={"watchdog_s": 0.3})
    levels = [(e["level"], e["kind"]) for e in s["emergencies"]]
    assert ("critical", "step_hung") in levels
    assert ("severe", "resume_after_freeze") in levels
    assert s["safety"]["watchdog_fired"] == 1 and s["epochs_completed"] == 6


def test_a_failed_fast_rollback_escalates_to_a_full_one(make_trainer: Any, tmp_path: Path) -> None:
    cfg = {**CALM, "run": {"epochs": 5}, "checkpoint": {"enabled": True}, "emergency": {"spike_lr_factor": 1.0}}
    trainer, _ = make_trainer(small_config(**cfg), faults=FaultPlan.parse(["nan-loss@epoch=3,step=1"]),
                              run_dir=tmp_path)
    trainer.safety.snapshots.cache.last_healthy = lambda before_step=None: None  # the RAM tier is gone
    s = trainer.fit().summary
    chain = [(e["level"], e["ok"], e["escalated_to"]) for e in s["emergencies"]]
    assert chain[:2] == [("severe", False, "major"), ("major", True, "")]
    assert s["rollbacks"][0]["tier"] == "full" and s["epochs_completed"] == 5


def test_spike_recovery_matches_a_run_that_never_saw_those_batches(make_trainer: Any) -> None:
    recovered = run(make_trainer, ["loss-spike@epoch=4,step=2"], epochs=7)
    assert recovered["rollbacks"] and recovered["rollbacks"][0]["succeeded"]
    cfg = {**CALM, "run": {"epochs": 7}, "emergency": {"spike_lr_factor": 1.0, "watchdog_s": 30.0}}
    reference, _ = make_trainer(small_config(**cfg))
    reference.batches.sampler.skipped.add((4, 2))
    clean = reference.fit().summary
    assert [h["train_loss"] for h in recovered["history"]] == [h["train_loss"] for h in clean["history"]]
    assert recovered["final_state_sha256"] == clean["final_state_sha256"]


def test_a_rollback_across_a_germination_restores_structure_alpha_and_optimizer_exactly(make_trainer: Any) -> None:
    trainer, _ = make_trainer(small_config(**CALM, run={"epochs": 8}))
    before: dict[str, Any] = {}

    class Grab:
        def on_boundary_end(self, t: Any, epoch: int, report: Any) -> None:
            seeds = t.kasmina.manifest()["seeds"]
            if not seeds and "snapshot" not in before:
                before["snapshot"] = t.safety.snapshots.cache.get(t.safety.snapshots._unproven)
            if seeds and any(s["stage"] != "SEED_STAGE_GERMINATED" for s in seeds) and "grown" not in before:
                before["grown"] = True
                snap = before["snapshot"]
                outcome = t.safety.coordinator.rollback(snap, "fast")
                assert outcome.succeeded, outcome.reason
                assert t.safety.coordinator.participants[1].last_restore == "rebuilt"
                restored = t.registry.capture()
                for key in ("model", "optimizer", "kasmina", "lr"):
                    assert state_checksum(restored[key]) == state_checksum(snap.state[key]), key

    trainer.callbacks.append(Grab())
    trainer.fit()
    assert before.get("grown"), "the run never grew a seed past germination"


def test_disk_full_drill_keeps_earlier_checkpoints_and_training_goes_on(make_trainer: Any, tmp_path: Path) -> None:
    s = run(make_trainer, ["disk-full@epoch=2"], tmp_path, epochs=5)
    assert "ENOSPC" in s["drills"][0]["outcome"] and s["breakers"]["checkpoint"]["failures"] == 1
    assert s["epochs_completed"] == 5
    listing = inspect(tmp_path / "checkpoints")
    assert listing["checkpoints"] and all(c["status"] == "ok" for c in listing["checkpoints"])


def test_corrupt_checkpoint_drill_falls_back_to_the_previous_one(make_trainer: Any, tmp_path: Path) -> None:
    s = run(make_trainer, ["corrupt-checkpoint@epoch=2"], tmp_path, epochs=4)
    outcome = s["drills"][0]["outcome"]
    assert outcome.startswith("corrupted ckpt-") and "recovery loads ckpt-" in outcome
    assert any("model.pt crc32c mismatch; fell back to ckpt-" in e for e in s["safety"]["recovery_events"])
