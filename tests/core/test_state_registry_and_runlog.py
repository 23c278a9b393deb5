"""The state registry (what a snapshot holds, in which order it is restored), the typed run log,
and the end of `fit()` (the summary is read from open components, then they close)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainer_fixtures import small_config  # type: ignore[import-not-found]

from esper.tolaria.observe.runlog import EpochRecord, Fallback, RollbackEntry, RunLog
from esper.tolaria.state.registry import StateRegistry


class Counter:
    def __init__(self, calls: list[str], name: str) -> None:
        self.calls, self.name, self.value = calls, name, 0

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.calls.append(f"load {self.name}")
        self.value = state["value"]


class KeepsRecords(Counter):
    def rewind_to(self, state: dict[str, int]) -> None:
        self.calls.append(f"rewind {self.name}")


def test_sections_restore_in_registration_order_and_rewind_where_a_component_can() -> None:
    calls: list[str] = []
    registry = StateRegistry()
    first, second, third = Counter(calls, "first"), KeepsRecords(calls, "second"), Counter(calls, "third")
    for key, component in (("first", first), ("second", second), ("none", None), ("third", third)):
        registry.register(key, component)
    first.value, third.value = 5, 7
    saved = registry.capture()
    assert saved == {"first": {"value": 5}, "second": {"value": 0}, "none": None, "third": {"value": 7}}
    first.value = 9
    registry.restore(saved, rewind=False)
    assert calls == ["load first", "load second", "load third"] and first.value == 5
    calls.clear()
    registry.restore(saved, rewind=True, skip={"third"})
    assert calls == ["load first", "rewind second"]


def test_a_section_is_registered_once_and_must_be_stateful() -> None:
    registry = StateRegistry()
    registry.register("a", Counter([], "a"))
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a", Counter([], "b"))
    with pytest.raises(TypeError, match="no state_dict/load_state_dict"):
        registry.register("b", object())  # type: ignore[arg-type]


def _epoch(n: int) -> EpochRecord:
    return EpochRecord(n, 10 * n, 1.0, 1.0, 0.5, {"host": 0.1}, 100, False, 0.1, 1.0, "")


def test_a_rollback_rewinds_the_history_and_keeps_the_incident_records() -> None:
    log = RunLog()
    log.add_epoch(_epoch(0))
    log.add_stage_changes(0, {"seed1": "GERMINATED"})
    saved = log.state_dict()
    log.add_epoch(_epoch(1))
    log.add_stage_changes(1, {"seed1": "TRAINING"})
    log.add_fallback(Fallback(1, "timeout", "no answer"))
    log.add_rollback(RollbackEntry("r1", "fast", 1, 12, "e0001", 1, 10, "SEVERE loss_nonfinite", True, {}, "", "x"))
    log.rewind_to(saved)
    assert [e.epoch for e in log.epochs] == [0] and log.seed_stage == {"seed1": "GERMINATED"}
    assert len(log.fallbacks) == 1 and len(log.rollbacks) == 1  # what happened is not undone
    resumed = RunLog()
    resumed.load_state_dict(log.state_dict())
    assert resumed.state_dict() == log.state_dict()


def test_a_component_registered_later_joins_every_checkpoint_and_is_resumed(make_trainer: Any,
                                                                            tmp_path: Path) -> None:
    class StopAfterEpoch1:
        def on_boundary_end(self, trainer: Any, epoch: int, report: Any) -> None:
            if epoch == 1:
                trainer.request_stop("test")

    class StepCounter:
        def __init__(self) -> None:
            self.steps = 0

        def on_step_end(self, trainer: Any, step: int, loss: Any) -> None:
            self.steps += 1

        def state_dict(self) -> dict[str, int]:
            return {"steps": self.steps}

        def load_state_dict(self, state: dict[str, int]) -> None:
            self.steps = state["steps"]

    config = small_config(run={"epochs": 4}, checkpoint={"enabled": True})
    counter = StepCounter()
    first, _ = make_trainer(config, run_dir=tmp_path, callbacks=(StopAfterEpoch1(), counter))
    first.registry.register("step_counter", counter)
    first.fit()
    counted = counter.steps
    assert counted == first.state.global_step > 0
    again = StepCounter()
    resumed, _ = make_trainer(config, run_dir=tmp_path, callbacks=(again,))
    resumed.registry.register("step_counter", again)
    resumed.resume_from(tmp_path / "checkpoints")
    assert again.steps == counted


def test_the_summary_is_built_before_the_components_close(make_trainer: Any) -> None:
    trainer, _ = make_trainer(small_config(run={"epochs": 2}))
    order: list[str] = []
    summary, close = trainer.summary, trainer.close
    trainer.summary = lambda: (order.append("summary"), summary())[1]
    trainer.close = lambda: (order.append("close"), close())[1]

    class AtFitEnd:
        def on_fit_end(self, t: Any) -> None:
            order.append("fit_end")

    trainer.callbacks.append(AtFitEnd())
    result = trainer.fit()
    assert order == ["fit_end", "summary", "close"]
    assert result.summary["epochs_completed"] == 2


def test_a_new_runs_starting_checkpoint_is_committed_before_the_first_step(make_trainer: Any,
                                                                            tmp_path: Path) -> None:
    from esper.tolaria.checkpoint import recover

    trainer, _ = make_trainer(small_config(checkpoint={"enabled": True}), run_dir=tmp_path)

    class AtFirstStep:
        committed: list[str] = []

        def on_step_begin(self, t: Any, step: int) -> None:
            if step == 0:  # a crash here must find the starting state on disk
                found = recover(tmp_path / "checkpoints", clean=False).checkpoint
                self.committed.append(found.name if found is not None else "")

    probe = AtFirstStep()
    trainer.callbacks.append(probe)
    trainer.fit()
    assert probe.committed and probe.committed[0].startswith("ckpt-")


def test_a_rollback_keeps_skipped_batches_for_any_positioned_sampler() -> None:
    """The rewind rule (batches skipped since the target stay skipped) is the loop's, not a feature
    each sampler must implement: a user's sampler with only the protocol gets it too."""
    from esper.tolaria.loop.batches import EpochBatches
    from esper.tolaria.state.position import TrainerState

    class UserSampler:  # the PositionedSampler protocol, nothing more
        def __init__(self) -> None:
            self.skipped: set[tuple[int, int]] = set()
            self.position = (0, 0)

        def set_position(self, epoch: int, batch: int) -> None:
            self.position = (epoch, batch)

        def consume(self) -> int:
            return self.position[1]

        def state_dict(self) -> dict[str, Any]:
            return {"position": self.position, "skipped": sorted(self.skipped)}

        def load_state_dict(self, state: Any) -> None:
            self.position, self.skipped = tuple(state["position"]), {tuple(s) for s in state["skipped"]}

    class Loader(list):  # type: ignore[type-arg]
        batch_sampler = UserSampler()

    batches = EpochBatches(Loader(), TrainerState())
    registry = StateRegistry()
    batches.register(registry)
    saved = registry.capture()
    batches.skip((2, 5))  # a rollback's offending batch, after the target was taken
    registry.restore(saved, rewind=True)
    assert Loader.batch_sampler.skipped == {(2, 5)}
    registry.restore(saved, rewind=False)  # a resume restores exactly what was saved
    assert Loader.batch_sampler.skipped == set()
