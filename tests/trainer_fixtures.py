"""Small, fast trainers for the core-loop tests (a uniquely named module: every test folder has
its own conftest, so `from conftest import ...` would depend on collection order)."""

from __future__ import annotations

from typing import Any

from esper.leyline import BusEnvelope, TelemetryPacket
from esper.tolaria.config import TolariaConfig, config_from_dict

FAST_GROWTH = {
    "kasmina": {"min_training_steps": 5, "blend_steps": 10, "seed_hidden": 16},
    "tamiyo": {"plateau_window": 1, "plateau_threshold": 1.0, "cooldown_epochs": 0, "min_training_epochs": 1,
               "shadow_epochs": 1, "probation_epochs": 1, "fossilize_tolerance": 10.0, "cull_tolerance": 10.0},
}


class MemoryBus:
    """An in-memory Oona bus for unit tests of the loop."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, BusEnvelope]] = []

    def publish(self, stream: str, envelope: BusEnvelope) -> str:
        self.messages.append((stream, envelope))
        return str(len(self.messages))

    def close(self) -> None:
        pass

    def events(self) -> list[str]:
        out = []
        for stream, env in self.messages:
            if stream == "oona.telemetry":
                out += [e.description for e in TelemetryPacket.FromString(env.payload).events]
        return out


class StopAfter:
    """Asks the run to stop (checkpoint and leave) once `epoch` has ended, as SIGTERM would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_boundary_end(self, trainer: Any, epoch: int, report: Any) -> None:
        if epoch == self.epoch:
            trainer.request_stop("test stop")


def small_config(**sections: dict[str, Any]) -> TolariaConfig:
    data: dict[str, Any] = {
        "run": {"name": "unit", "epochs": 6, "seed": 0, "threads": 1},
        "data": {"dataset": "digits", "batch_size": 64},
        "optimizer": {"lr": 0.02},
        "model": {"hidden": [8]},
        "checkpoint": {"enabled": False},
        "telemetry": {"jsonl": False},
        **{k: dict(v) for k, v in FAST_GROWTH.items()},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data)
