"""What every logger receives through the protocol, read from an in-memory logger: the config once,
one metrics dict per epoch, events with reasons, how the run ended; and a failing logger never
stops the run."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from logger_runs import logged_config, run_logged  # type: ignore[import-not-found]

from esper.tolaria.observe.loggers import LoggerCallback, RunEvent, RunStart, StepLoggerCallback
from esper.tolaria.observe.loggers.callback import MAX_FAILURES


class MemoryLogger:
    name = "memory"

    def __init__(self, gone: bool = False) -> None:
        self.gone = gone  # every call after start fails, as when a tracking server has gone away
        self.starts: list[RunStart] = []
        self.epochs: list[tuple[int, int, dict[str, float]]] = []
        self.steps: list[tuple[int, dict[str, float]]] = []
        self.events: list[RunEvent] = []
        self.closed: list[str] = []

    def _maybe_fail(self, method: str) -> None:
        if self.gone:
            raise OSError(f"{method}: the tracking server is gone")

    def start(self, run: RunStart) -> None:
        self.starts.append(run)

    def log_epoch(self, epoch: int, step: int, metrics: Mapping[str, float]) -> None:
        self._maybe_fail("log_epoch")
        self.epochs.append((epoch, step, dict(metrics)))

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        self._maybe_fail("log_step")
        self.steps.append((step, dict(metrics)))

    def log_events(self, events: list[RunEvent]) -> None:
        self._maybe_fail("log_events")
        self.events += events

    def close(self, status: str) -> None:
        self._maybe_fail("close")
        self.closed.append(status)


class Boom:
    def on_boundary_end(self, trainer: Any, epoch: int, report: Any) -> None:
        if epoch == 1:
            raise RuntimeError("a bug in someone's callback")


def test_a_logger_gets_the_config_every_epoch_seed_events_and_a_finished_close(tmp_path: Path) -> None:
    memory = MemoryLogger()
    trainer = run_logged(logged_config(3), tmp_path, extra=(LoggerCallback(memory),))
    (start,) = memory.starts
    assert start.run_id == trainer.run_id and not start.resumed and start.step == 0
    assert start.config["optimizer"]["lr"] == 0.02
    assert [(e, s) for e, s, _ in memory.epochs] == [(r.epoch, r.global_step) for r in trainer.log.epochs]
    metrics = memory.epochs[-1][2]
    assert metrics["val/accuracy"] == trainer.log.epochs[-1].val_accuracy and metrics["lr/seed1"] > 0
    assert [(e.what, e.epoch) for e in memory.events if e.kind == "seed"] == [("GERMINATED", 1), ("TRAINING", 2)]
    assert memory.closed == ["finished"] and memory.steps == []


def test_a_stopped_run_closes_stopped_and_its_resume_starts_where_it_stopped(tmp_path: Path) -> None:
    first, second = MemoryLogger(), MemoryLogger()
    config = logged_config(3, emergency={"spike_lr_factor": 1.0})
    run_logged(config, tmp_path, stop_after=1, drills=("nan-loss@epoch=1,step=3",), extra=(LoggerCallback(first),))
    assert first.closed == ["stopped"] and [e.kind for e in first.events].count("rollback") == 1
    trainer = run_logged(config, tmp_path, resume=True, extra=(LoggerCallback(second),))
    (start,) = second.starts
    assert start.resumed and start.step == trainer.log.epochs[1].global_step
    assert [e for e, _, _ in second.epochs] == [2]
    assert [e.kind for e in second.events if e.kind != "seed"] == [], "the first segment's incidents are not re-sent"
    assert second.closed == ["finished"]


def test_a_run_that_raises_closes_its_loggers_as_failed(tmp_path: Path) -> None:
    memory = MemoryLogger()
    with pytest.raises(RuntimeError, match="a bug in someone's callback"):
        run_logged(logged_config(3), tmp_path, extra=(LoggerCallback(memory), Boom()))
    assert memory.closed == ["failed"]


def test_a_failing_logger_is_switched_off_and_the_run_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    failing, healthy = MemoryLogger(gone=True), MemoryLogger()
    callback = LoggerCallback(failing)
    with caplog.at_level(logging.WARNING, logger="esper.tolaria.observe.loggers.callback"):
        trainer = run_logged(logged_config(MAX_FAILURES + 1), tmp_path, extra=(callback, LoggerCallback(healthy)))
    assert len(trainer.log.epochs) == MAX_FAILURES + 1 and len(healthy.epochs) == MAX_FAILURES + 1
    assert not callback.enabled
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failures == ["memory logger: log_epoch failed (1 in a row)", "memory logger: log_events failed (2 in a row)",
                        "memory logger: log_epoch failed (3 in a row)"], "then it is not called again"
    assert f"memory logger switched off for the rest of the run after {MAX_FAILURES} failures" in caplog.text


def test_only_a_step_logger_hooks_the_step_and_it_logs_every_nth(tmp_path: Path) -> None:
    assert not hasattr(LoggerCallback(MemoryLogger()), "on_step_end"), "no per-step call unless asked"
    memory = MemoryLogger()
    trainer = run_logged(logged_config(2), tmp_path, extra=(StepLoggerCallback(memory, every=7),))
    assert [s for s, _ in memory.steps] == list(range(7, trainer.state.global_step + 1, 7))
    assert all(m["train/step_loss"] > 0 and "lr/host" in m for _, m in memory.steps)
