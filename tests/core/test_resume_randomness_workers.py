"""Exact resume for models that draw random numbers (dropout) and with DataLoader workers: the
iterator built after a restart must not shift the random stream, and the data position is the
batch the loop consumed, not the one the workers prefetched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_fixtures import small_config  # type: ignore[import-not-found]

from esper.tolaria.checkpoint import recover
from esper.tolaria.config import ConfigError, TolariaConfig
from esper.tolaria.data import ResumableBatchSampler
from esper.tolaria.loop.build import build_trainer
from esper.tolaria.models import HostMLP
from esper.tolaria.state.rng import rng_state, set_rng_state

CALM = {"boundary": {"state_assembly_ms": 1e4, "tamiyo_ms": 1e4, "apply_ms": 1e4, "check_ms": 1e4,
                     "total_ms": 1e5}, "handshake": {"tamiyo_timeout_s": 30.0},
        "emergency": {"broadcast": False, "spike_lr_factor": 1.0, "watchdog_s": 30.0}}


def dropout_config(workers: int, **sections: dict[str, Any]) -> TolariaConfig:
    cfg: dict[str, Any] = {**CALM, "run": {"epochs": 3}, "model": {"hidden": [8], "dropout": 0.2},
                           "data": {"num_workers": workers}}
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return small_config(**cfg)


class StopAt:
    """Asks the trainer to stop (as SIGTERM does) once `step` steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, t: Any, step: int, loss: Any) -> None:
        if step == self.step:
            t.request_stop("test")


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_with_dropout_and_workers_matches_the_uninterrupted_run(tmp_path: Path,
                                                                                 workers: int) -> None:
    reference = build_trainer(dropout_config(workers))
    reference.fit()

    config = dropout_config(workers, checkpoint={"enabled": True})
    stopped = build_trainer(config, run_dir=tmp_path, callbacks=(StopAt(30),))
    assert stopped.fit().summary["stopped"] == "test"
    batches = len(stopped.batches.loader)  # type: ignore[arg-type]
    # The position is the batch the loop consumed last, however far the workers fetched ahead.
    assert (stopped.state.epoch, stopped.state.batch_in_epoch) == (30 // batches, 30 % batches)

    resumed = build_trainer(config, run_dir=tmp_path)
    resumed.resume_from(tmp_path / "checkpoints")
    assert resumed.state.global_step == 30
    resumed.fit()
    assert resumed.final_state_sha256() == reference.final_state_sha256()


def test_a_resumed_run_keeps_its_run_id_in_its_checkpoints_and_signals(tmp_path: Path) -> None:
    config = dropout_config(0, checkpoint={"enabled": True})
    stopped = build_trainer(config, run_dir=tmp_path, callbacks=(StopAt(25),))
    stopped.fit()
    resumed = build_trainer(config, run_dir=tmp_path)
    assert resumed.run_id != stopped.run_id  # a fresh trainer draws a new id...
    resumed.resume_from(tmp_path / "checkpoints")
    assert resumed.run_id == stopped.run_id  # ...and a resume takes the run's back
    assert resumed.safety.protocol.run_id == stopped.run_id
    resumed.fit()
    newest = recover(tmp_path / "checkpoints", clean=False).checkpoint
    assert newest is not None and newest.snapshot().global_step > 25
    assert newest.manifest.run_id == stopped.run_id
    assert resumed.summary()["run_id"] == stopped.run_id


@pytest.mark.parametrize("workers", [0, 2])
def test_with_workers_the_batch_skipped_after_a_nan_is_the_offending_one(workers: int) -> None:
    bad = (1, 6)
    trainer = build_trainer(dropout_config(workers))
    sampler = trainer.batches.sampler
    targets = trainer.batches.loader.dataset.tensors[1]  # type: ignore[attr-defined]
    bad_y = targets[sampler.batches_for_epoch(bad[0])[bad[1]]]
    plain_loss = trainer.task.criterion  # the task's cross-entropy on (prediction, target)

    def poisoned(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # by content, not by index
        loss = plain_loss(out, y)
        hit = trainer.model.training and y.shape == bad_y.shape and torch.equal(y, bad_y)
        return loss * float("nan") if hit else loss

    trainer.task.loss_fn = poisoned
    summary = trainer.fit().summary
    assert [e["kind"] for e in summary["emergencies"]] == ["loss_nonfinite"]
    assert sampler.skipped == {bad}


def test_the_replay_after_a_mid_epoch_rollback_draws_the_same_dropout_masks() -> None:
    """A spike rolls back to a mid-epoch snapshot; the replay must equal a run that skipped the batch."""
    from esper.tolaria.drills import FaultPlan

    cfg = {"snapshots": {"every_steps": 4, "capacity": 8}}
    recovered = build_trainer(dropout_config(0, **cfg), faults=FaultPlan.parse(["loss-spike@epoch=1,step=10"]))
    summary = recovered.fit().summary
    target = summary["rollbacks"][0]
    assert target["succeeded"] and target["target_step"] % len(recovered.batches.loader) != 0  # mid-epoch
    clean = build_trainer(dropout_config(0, **cfg))
    clean.batches.sampler.skipped.add((1, 10))
    clean.fit()
    assert recovered.final_state_sha256() == clean.final_state_sha256()


def test_the_sampler_position_follows_the_batches_received_not_those_prefetched() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(40.0))
    sampler = ResumableBatchSampler(40, 4, seed=1)
    sampler.skipped.add((0, 3))
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=2)
    expected = [i for i in range(10) if i != 3]
    batches = sampler.batches_for_epoch(0)
    for index, (x,) in zip(expected, loader, strict=True):
        assert sampler.consume() == index == sampler.last_index
        assert x.long().tolist() == batches[index]
    sampler.set_position(0, 7)  # a new iteration (a rollback) starts a fresh queue
    assert [sampler.consume() for _ in iter(sampler)] == [7, 8, 9]


def test_rng_state_saves_and_restores_cuda_generators_when_cuda_is_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    live = {0: torch.tensor([1], dtype=torch.uint8), 1: torch.tensor([2], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [live[0].clone(), live[1].clone()])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: live.__setitem__(device, state.clone()))
    saved = rng_state()
    assert [int(s) for s in saved["cuda"]] == [1, 2]
    live[0], live[1] = torch.tensor([7], dtype=torch.uint8), torch.tensor([8], dtype=torch.uint8)
    set_rng_state(saved)
    assert (int(live[0]), int(live[1])) == (1, 2)


def test_rng_state_reads_no_cuda_generator_before_cuda_is_initialized(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("would initialize CUDA"))
    assert rng_state()["cuda"] == []


def test_model_dropout_adds_dropout_after_each_hidden_activation_and_is_validated() -> None:
    model = HostMLP(4, [6, 5], 3, dropout=0.1)
    kinds = [type(m).__name__ for m in model.body]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout"]
    plain = HostMLP(4, [6, 5], 3)
    assert [n for n, _ in plain.named_parameters()] == ["body.0.weight", "body.0.bias", "body.2.weight",
                                                       "body.2.bias", "head.weight", "head.bias"]
    with pytest.raises(ConfigError, match=r"model\.dropout"):
        small_config(model={"dropout": 1.0})


class NoisyDigits(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Augmentation drawn inside the DataLoader's worker processes (seeded from its base seed)."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = (t[indices] for t in self.base.tensors)
        return list(zip(x + 0.05 * torch.randn_like(x), y, strict=True))


class StopAtBoundary:
    def on_boundary_end(self, t: Any, epoch: int, report: Any) -> None:
        if epoch == 0:
            t.request_stop("test")


def with_own_generator(trainer: Any) -> Any:
    """The user's own DataLoader: worker augmentation, and a generator of its own for the base seed."""
    trainer.batches.loader = torch.utils.data.DataLoader(
        NoisyDigits(trainer.batches.loader.dataset), batch_sampler=trainer.batches.sampler, num_workers=2,
        generator=torch.Generator().manual_seed(7))
    return trainer


def test_a_users_loader_with_its_own_generator_resumes_its_worker_augmentation_exactly(tmp_path: Path) -> None:
    reference = with_own_generator(build_trainer(dropout_config(2, run={"epochs": 2})))
    reference.fit()
    config = dropout_config(2, run={"epochs": 2}, checkpoint={"enabled": True})
    with_own_generator(build_trainer(config, run_dir=tmp_path, callbacks=(StopAtBoundary(),))).fit()
    resumed = with_own_generator(build_trainer(config, run_dir=tmp_path))
    resumed.resume_from(tmp_path / "checkpoints")
    assert (resumed.state.epoch, resumed.state.batch_in_epoch) == (1, 0)
    resumed.fit()
    assert resumed.final_state_sha256() == reference.final_state_sha256()
