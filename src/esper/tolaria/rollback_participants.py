"""The participants of a rollback: Kasmina (structure), Tolaria (weights and training state),
Tamiyo (controller state). Each prepares without side effects, commits, and confirms against
the snapshot; the coordinator runs them in this order and aborts all on any failure.

Abort cannot return to the pre-rollback state (that state is the one being abandoned); a
failed fast rollback is escalated by the emergency protocol to a full rollback from disk.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

from esper.tolaria.snapshot import Snapshot
from esper.tolaria.snapshot_cache import RestoreError, restore_tensors_, sample_bits
from esper.tolaria.state import restore_state

if TYPE_CHECKING:
    from esper.tolaria.trainer import TolariaTrainer


def _manifest_json(manifest: Any) -> str:
    return json.dumps(manifest, sort_keys=True, default=str)


class KasminaParticipant:
    name = "kasmina"

    def __init__(self, trainer: TolariaTrainer) -> None:
        self.t = trainer

    def prepare(self, target: Snapshot) -> bool:
        kasmina = target.state.get("kasmina") or {}
        return "manifest" in kasmina and kasmina["manifest"].get("slots") == list(self.t.kasmina.manifest()["slots"])

    def commit(self, target: Snapshot) -> None:
        self.t.kasmina.load_state_dict(target.state["kasmina"])

    def confirm(self, target: Snapshot) -> bool:
        return _manifest_json(self.t.kasmina.manifest()) == _manifest_json(target.state["kasmina"]["manifest"])

    def abort(self, target: Snapshot) -> None:
        """Nothing to undo that would help: the escalation restores from disk."""


class TolariaParticipant:
    """Weights, optimizer, LR, aggregator, breakers, RNG, data position, counters.

    When the structure did not change since the snapshot, tensors are copied in place
    (`restore_tensors_`, one foreach copy): a fast rollback then costs about a raw `copy_`.
    """

    name = "tolaria"

    def __init__(self, trainer: TolariaTrainer) -> None:
        self.t = trainer

    def prepare(self, target: Snapshot) -> bool:
        return all(k in target.state for k in ("model", "optimizer", "lr", "rng", "trainer"))

    def commit(self, target: Snapshot) -> None:
        t = self.t
        live = {"model": t.model.state_dict(), "optimizer": t.optim.state_dict()["state"]}
        snap = {"model": target.state["model"], "optimizer": target.state["optimizer"]["state"]}
        try:
            restore_tensors_(live, snap, verify=False)
            in_place = [g["param_names"] for g in t.optim.state_dict()["groups"]] == \
                [g["param_names"] for g in target.state["optimizer"]["groups"]]
        except RestoreError:
            in_place = False
        rest = {k: v for k, v in target.state.items() if k not in ("model", "optimizer", "kasmina")} \
            if in_place else {k: v for k, v in target.state.items() if k != "kasmina"}
        restore_state(t, rest, keep_records=True, structure=not in_place)

    def confirm(self, target: Snapshot) -> bool:
        t = self.t
        live = t.model.state_dict()
        saved = target.state["model"]
        if live.keys() != saved.keys() or t.state.global_step != target.state["trainer"]["global_step"]:
            return False
        # Sampled raw bits of the first and last tensors: proves the copy took effect without a
        # checksum that would cost more than the copy (tests prove bit-exactness with state_checksum).
        keys = list(live)
        return all(torch.equal(sample_bits(live[k]), sample_bits(saved[k])) for k in {keys[0], keys[-1]})

    def abort(self, target: Snapshot) -> None:
        """See the module docstring."""


class TamiyoParticipant:
    name = "tamiyo"

    def __init__(self, trainer: TolariaTrainer) -> None:
        self.t = trainer

    def prepare(self, target: Snapshot) -> bool:
        return "tamiyo" in target.state

    def commit(self, target: Snapshot) -> None:
        state = target.state.get("tamiyo")
        if state is not None and hasattr(self.t.tamiyo, "load_state_dict"):
            self.t.tamiyo.load_state_dict(state)

    def confirm(self, target: Snapshot) -> bool:
        state = target.state.get("tamiyo")
        if state is None or not hasattr(self.t.tamiyo, "state_dict"):
            return True
        return _manifest_json(self.t.tamiyo.state_dict()) == _manifest_json(state)

    def abort(self, target: Snapshot) -> None:
        """Tamiyo's history is advisory; a full rollback restores it with everything else."""


def participants(trainer: TolariaTrainer) -> list[Any]:
    return [KasminaParticipant(trainer), TolariaParticipant(trainer), TamiyoParticipant(trainer)]
