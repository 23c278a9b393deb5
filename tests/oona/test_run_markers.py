"""A run's telemetry names the run on every envelope and opens and closes with run markers."""

from __future__ import annotations

import time
from typing import Any

from trainer_fixtures import MemoryBus, StopAfter, small_config  # type: ignore[import-not-found]

from esper.leyline import TelemetryPacket, parse
from esper.tolaria.loop.build import build_trainer
from esper.tolaria.observe.telemetry import RUN_ENDED, RUN_ID, RUN_STARTED, TelemetryCollector
from esper.tolaria.state.position import TrainerState


def _events(bus: MemoryBus) -> list[tuple[str, dict[str, str]]]:
    out = []
    for stream, envelope in bus.messages:
        if stream.endswith("telemetry"):
            for event in parse(TelemetryPacket, envelope.payload).events:
                out.append((event.description, dict(event.attributes)))
    return out


def test_every_envelope_names_the_run_between_a_start_and_an_end_marker(tmp_path: Any) -> None:
    bus = MemoryBus()
    trainer = build_trainer(small_config(run={"epochs": 2}), bus=bus)
    trainer.fit()
    assert bus.messages and {e.attributes.get(RUN_ID) for _, e in bus.messages} == {trainer.run_id}
    events = _events(bus)
    assert events[0] == (RUN_STARTED, {"run_id": trainer.run_id, "epoch": "0", "step": "0", "epochs": "2",
                                       "resumed_from": ""})
    assert events[-1][0] == RUN_ENDED and events[-1][1]["status"] == "finished" and events[-1][1]["epoch"] == "2"


def test_a_resumed_run_marks_the_checkpoint_it_started_from_and_a_stop_says_why(tmp_path: Any) -> None:
    config = small_config(run={"epochs": 3}, checkpoint={"enabled": True})
    bus = MemoryBus()
    first = build_trainer(config, bus=bus, run_dir=tmp_path, callbacks=(StopAfter(0),))
    first.fit()
    stopped = _events(bus)
    assert stopped[-1][0] == RUN_ENDED and stopped[-1][1]["status"] == "stopped"
    assert stopped[-1][1]["reason"] == "test stop"
    bus = MemoryBus()
    resumed = build_trainer(config, bus=bus, run_dir=tmp_path)
    resumed.resume_from(tmp_path / "checkpoints")
    resumed.fit()
    start = _events(bus)[0]
    assert start[0] == RUN_STARTED and start[1]["resumed_from"] == resumed.resumed_from != ""
    assert start[1]["epoch"] == "1" and start[1]["run_id"] == first.run_id == resumed.run_id


class SlowBus(MemoryBus):
    """Each publish takes a while, so packets wait in the collector's queue."""

    def publish(self, stream: str, envelope: Any) -> str:
        time.sleep(0.02)
        return super().publish(stream, envelope)


def test_the_end_marker_is_sent_after_everything_queued_before_it() -> None:
    bus = SlowBus()
    collector = TelemetryCollector(bus, run_id="r1")
    try:
        for i in range(5):
            collector.emit_event(f"event{i}")
        collector.publish_step(3, 1.0, 1.0)  # LOW priority: sent after the NORMAL events
        collector.run_ended("finished", TrainerState(epoch=1, global_step=4))
        descriptions = [d for d, _ in _events(bus)]
        assert descriptions == [*(f"event{i}" for i in range(5)), RUN_ENDED]
        assert len(bus.messages) == 7, "the step packet too, before the marker"
    finally:
        collector.close()
