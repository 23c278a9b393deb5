"""Configs and helpers the CUDA tests share."""

from __future__ import annotations

from typing import Any

from esper.tolaria.config import TolariaConfig, config_from_dict


def cuda_config(**sections: Any) -> TolariaConfig:
    """A small bundled job on CUDA: no telemetry file, checkpoints, broadcast; `sections` override
    (a section given replaces the default one's keys it names)."""
    base: dict[str, Any] = {
        "run": {"device": "cuda", "epochs": 2, "seed": 0},
        "data": {"dataset": "digits", "batch_size": 32},
        "model": {"hidden": [64]},
        "telemetry": {"jsonl": False},
        "checkpoint": {"enabled": False},
        "emergency": {"broadcast": False},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return config_from_dict(base)
