"""Deferred loss reads (`run.loss_readback = "deferred"`, what CUDA runs use by default), exercised
on the CPU: a step's loss is read one step later, and the run's decisions and final state are those
of a run that reads every loss at once, faults included."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from trainer_fixtures import small_config  # type: ignore[import-not-found]

from esper.tolaria.drills import FaultPlan
from esper.tolaria.recovery.loss_readback import LossReadback, defers_reads

CALM = {"boundary": {"state_assembly_ms": 1e4, "tamiyo_ms": 1e4, "apply_ms": 1e4, "check_ms": 1e4,
                     "total_ms": 1e5}, "handshake": {"tamiyo_timeout_s": 30.0}}


def run(make_trainer: Any, readback: str, drills: list[str] = (), **sections: Any) -> tuple[Any, dict[str, Any]]:
    cfg: dict[str, Any] = {**CALM, "run": {"epochs": 5, "loss_readback": readback},
                           "emergency": {"spike_lr_factor": 1.0, "watchdog_s": 30.0, "grad_check_every": 50}}
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    trainer, _ = make_trainer(small_config(**cfg), faults=FaultPlan.parse(list(drills)))
    return trainer, trainer.fit().summary


def test_the_readback_holds_each_loss_back_exactly_one_step() -> None:
    reads = LossReadback(torch.device("cpu"))
    reads.submit(torch.tensor(1.0), epoch=0, step=0, batches=(0,))
    assert reads.arrived() == [], "the newest step's loss waits for the next step"
    reads.submit(torch.tensor(2.0), epoch=0, step=1, batches=(1,))
    [(pending, value)] = reads.arrived()
    assert (pending.step, pending.batches, value) == (0, (0,), 1.0) and len(reads) == 1
    reads.submit(torch.tensor(float("nan")), epoch=0, step=2, batches=(2,))
    assert [p.step for p, _ in reads.drain()] == [1, 2] and len(reads) == 0
    reads.submit(torch.tensor(3.0), epoch=0, step=3, batches=(3,))
    reads.clear()
    assert reads.drain() == []


def test_auto_defers_on_cuda_in_one_process_only() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert defers_reads("auto", cuda, 1) and not defers_reads("auto", cuda, 2) and not defers_reads("auto", cpu, 1)
    assert defers_reads("deferred", cpu, 1) and not defers_reads("sync", cuda, 1)
    with pytest.raises(ValueError, match="needs one process"):
        defers_reads("deferred", cuda, 2)


def test_a_deferred_run_ends_in_the_same_state_as_a_synchronous_one(make_trainer: Any) -> None:
    sync_trainer, sync = run(make_trainer, "sync")
    deferred_trainer, deferred = run(make_trainer, "deferred")
    assert deferred_trainer.compute.defer_reads and not sync_trainer.compute.defer_reads
    assert deferred["final_state_sha256"] == sync["final_state_sha256"]
    assert [h["train_loss"] for h in deferred["history"]] == [h["train_loss"] for h in sync["history"]]
    assert deferred["emergencies"] == [] == sync["emergencies"]


def test_a_loss_spike_found_one_step_late_skips_the_batch_a_synchronous_run_skips(make_trainer: Any) -> None:
    _, sync = run(make_trainer, "sync", ["loss-spike@epoch=3,step=2"])
    _, deferred = run(make_trainer, "deferred", ["loss-spike@epoch=3,step=2"])
    assert [e["kind"] for e in deferred["emergencies"]] == ["loss_spike"]
    assert [r["tier"] for r in deferred["rollbacks"]] == ["fast"] and deferred["epochs_completed"] == 5
    assert deferred["final_state_sha256"] == sync["final_state_sha256"], "the same batch was skipped"


def test_a_transient_nan_found_late_is_replayed_with_checks_and_leaves_no_trace(make_trainer: Any) -> None:
    """A NaN read one step late cannot be blamed on its batch (the update is already applied): the
    rollback replays the steps up to it with checks. A fault that does not recur (the drill fires
    once, like a bit flip) skips nothing, so the run ends exactly where a run without it ends."""
    _, clean = run(make_trainer, "deferred")
    _, s = run(make_trainer, "deferred", ["nan-loss@epoch=2,step=3"])
    assert [e["kind"] for e in s["emergencies"]] == ["loss_nonfinite"]
    assert "read one step late" in s["emergencies"][0]["reason"]
    assert [r["tier"] for r in s["rollbacks"]] == ["fast"] and s["epochs_completed"] == 5
    assert s["final_state_sha256"] == clean["final_state_sha256"]


def test_a_batch_that_is_nan_every_time_is_found_by_the_replay_and_skipped(make_trainer: Any) -> None:
    """A batch that produces NaN whenever it is trained: found late, replayed with checks, found
    again at once and skipped; the run ends in the synchronous run's state."""
    finals = {}
    for mode in ("sync", "deferred"):
        trainer, _ = make_trainer(small_config(**CALM, run={"epochs": 4, "loss_readback": mode},
                                               emergency={"spike_lr_factor": 1.0, "grad_check_every": 50}))
        poison_nan_batch(trainer, epoch=1, batch=4)
        s = trainer.fit().summary
        finals[mode] = s
        assert s["epochs_completed"] == 4 and s["final_val_accuracy"] > 0.3
    sync, deferred = finals["sync"], finals["deferred"]
    assert len(sync["rollbacks"]) == 1 and len(deferred["rollbacks"]) == 2
    assert deferred["final_state_sha256"] == sync["final_state_sha256"]


def poison_nan_batch(trainer: Any, *, epoch: int, batch: int) -> None:
    """The host loss is NaN whenever (epoch, batch) is trained, in every replay of it."""
    plain = trainer.host_loss

    def loss(out: Any, data: Any) -> torch.Tensor:
        value = plain(out, data)
        position = trainer.state
        return value * float("nan") if (position.epoch, position.batch_in_epoch) == (epoch, batch) else value

    trainer.host_loss = loss


def test_every_deferred_loss_is_read_before_the_boundary(make_trainer: Any) -> None:
    """A fault on the epoch's last step is found and rolled back before the boundary: validation,
    Tamiyo and the boundary's snapshot and checkpoint never see the weights it broke."""
    trainer, _ = make_trainer(small_config(**CALM, run={"epochs": 1}))
    last = len(trainer.batches.loader) - 1
    cfg = small_config(**CALM, run={"epochs": 4, "loss_readback": "deferred"},
                       emergency={"spike_lr_factor": 1.0, "grad_check_every": 50})
    trainer, _ = make_trainer(cfg, faults=FaultPlan.parse([f"nan-loss@epoch=1,step={last}"]))
    seen: list[bool] = []

    class WeightsAtBoundary:
        def on_boundary_begin(self, t: Any, epoch: int) -> None:
            seen.append(all(bool(torch.isfinite(p).all()) for p in t.model.parameters()))

    trainer.callbacks.append(WeightsAtBoundary())
    s = trainer.fit().summary
    assert s["emergencies"][0]["kind"] == "loss_nonfinite" and s["emergencies"][0]["epoch"] == 1
    assert seen and all(seen), "a boundary ran on weights a late-read NaN step had broken"
    assert s["epochs_completed"] == 4
