"""Capture and restore the complete training state (the content of a `Snapshot`).

Order matters on restore: Kasmina's structure first (so a grown model has its seed modules),
then weights, then the optimizer (rebuilt for that structure, state loaded by parameter name),
then the LR controller (which re-writes every group's LR), then the rest.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from esper.tolaria.snapshot import Snapshot, deep_clone

if TYPE_CHECKING:
    from esper.tolaria.trainer import TolariaTrainer

# Records of what happened stay when a rollback restores an earlier state; a resume restores them.
RECORD_KEYS = ("rollbacks", "emergencies", "fallbacks", "apply_failures")


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _optional_state(component: Any) -> Any:
    fn = getattr(component, "state_dict", None)
    return fn() if fn is not None else None


def capture_state(t: TolariaTrainer) -> dict[str, Any]:
    """Everything needed to continue bit-for-bit from this point, with tensors cloned."""
    return deep_clone(live_state(t))  # type: ignore[no-any-return]


def live_state(t: TolariaTrainer) -> dict[str, Any]:
    """The same sections as `capture_state`, holding the *live* tensors: clone before keeping it."""
    return {
        "model": t.model.state_dict(),
        "kasmina": t.kasmina.state_dict(),
        "optimizer": t.optim.state_dict(),
        "lr": t.lr.state_dict(),
        "aggregator": t.aggregator.state_dict(),
        "breakers": t.breakers.state_dict(),
        "conservative": t.conservative.state_dict(),
        "tamiyo": _optional_state(t.tamiyo),
        "monitors": t.safety.monitors_state() if t.safety is not None else None,
        "rng": rng_state(),
        "data": _optional_state(t.sampler),
        "trainer": {
            "epoch": t.state.epoch, "batch_in_epoch": t.state.batch_in_epoch, "global_step": t.state.global_step,
            "history": t.history, "seed_history": t.seed_history, "seed_stage": t._seed_stage,
            "config_sha256": t.config.sha256(), "run_id": t.run_id,
            **{k: getattr(t, k) for k in RECORD_KEYS},
            "emergencies": t.safety.emergency_records(),
        },
    }


def take_snapshot(t: TolariaTrainer, snapshot_id: str) -> Snapshot:
    return Snapshot(snapshot_id=snapshot_id, epoch=t.state.epoch, global_step=t.state.global_step,
                    state=capture_state(t))


def restore_state(t: TolariaTrainer, state: Mapping[str, Any], *, keep_records: bool, structure: bool = True) -> None:
    """Make the trainer's state that of `state`. `keep_records`: a rollback keeps its incident lists.

    Sections missing from `state` are left alone (a fast rollback has already copied the
    tensors in place and passes only the rest); `structure=False` skips Kasmina, weights and
    the optimizer rebuild."""
    if structure:
        if "kasmina" in state:
            t.kasmina.load_state_dict(state["kasmina"])  # structure first
        t.model.load_state_dict(state["model"])
        t.optim.load_state_dict(state["optimizer"])
    t.lr.load_state_dict(state["lr"])
    t.lr.refresh()
    t.aggregator.load_state_dict(state["aggregator"])
    t.breakers.load_state_dict(state["breakers"])
    t.conservative.load_state_dict(state["conservative"])
    if state.get("tamiyo") is not None and hasattr(t.tamiyo, "load_state_dict"):
        t.tamiyo.load_state_dict(state["tamiyo"])
    if state.get("monitors") is not None and t.safety is not None:
        t.safety.load_monitors_state(state["monitors"])
    if state.get("data") is not None and t.sampler is not None:
        t.sampler.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    _restore_trainer_counters(t, state["trainer"], keep_records=keep_records)


def _restore_trainer_counters(t: TolariaTrainer, saved: Mapping[str, Any], *, keep_records: bool) -> None:
    t.state.epoch = saved["epoch"]
    t.state.batch_in_epoch = saved["batch_in_epoch"]
    t.state.global_step = saved["global_step"]
    t.history = [dict(h) for h in saved["history"]]
    t.seed_history = {k: [dict(x) for x in v] for k, v in saved["seed_history"].items()}
    t._seed_stage = dict(saved["seed_stage"])
    if not keep_records:
        for key in RECORD_KEYS:
            setattr(t, key, [dict(x) for x in saved.get(key, [])])
