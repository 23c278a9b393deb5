"""The participants of a rollback: Kasmina (structure), Tolaria (weights and training state),
Tamiyo (controller state). Each prepares without side effects, commits, and confirms against
the snapshot; the coordinator runs them in this order and aborts all on any failure.

Abort cannot return to the pre-rollback state (that state is the one being abandoned); a
failed fast rollback is escalated by the emergency protocol to a full rollback from disk.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from esper.contracts import ExecutionLayer, StatefulComponent
from esper.tolaria.control.optimizer import IMPLEMENTATION_KEYS, DynamicOptimizerManager
from esper.tolaria.recovery.restore_plan import RestorePlan
from esper.tolaria.recovery.snapshot_cache import (
    RestoreError,
    confirm_restored,
    copy_in_place_,
    restore_tensors_,
    samples_equal,
)
from esper.tolaria.state.position import TrainerState
from esper.tolaria.state.registry import StateRegistry
from esper.tolaria.state.snapshot import Snapshot, SnapshotCopyError


def _manifest_json(manifest: Any) -> str:
    return json.dumps(manifest, sort_keys=True, default=str)


def _same_structure(live: Mapping[str, Any], saved: Mapping[str, Any]) -> bool:
    """Whether the live manifest is the saved one. Slot shapes are observations, not state: Kasmina
    learns a slot's shape at the first forward that reaches it and keeps what it learned through any
    restore, so a snapshot taken before that forward (a user model's birth snapshot) lacks shapes the
    live layer has. It is the same structure when everything else is equal and every saved shape is
    the one observed."""
    live_shapes, saved_shapes = dict(live.get("shapes") or {}), dict(saved.get("shapes") or {})
    if any(_manifest_json(live_shapes.get(k)) != _manifest_json(v) for k, v in saved_shapes.items()):
        return False
    rest_live = {k: v for k, v in live.items() if k != "shapes"}
    rest_saved = {k: v for k, v in saved.items() if k != "shapes"}
    return rest_live == rest_saved or _manifest_json(rest_live) == _manifest_json(rest_saved)  # tuples vs lists


class KasminaParticipant:
    name = "kasmina"

    def __init__(self, kasmina: ExecutionLayer) -> None:
        self.kasmina = kasmina
        self._prepared: Any = None  # the live manifest read by prepare (prepares change nothing)

    def prepare(self, target: Snapshot) -> bool:
        kasmina = target.state.get("kasmina") or {}
        self._prepared = live = self.kasmina.manifest()
        return "manifest" in kasmina and kasmina["manifest"].get("slots") == list(live["slots"])

    def commit(self, target: Snapshot) -> None:
        # The manifest is Kasmina's whole state: when the live one equals the target's there is
        # nothing to rebuild (the common fast rollback, within one structure).
        live, self._prepared = self._prepared, None
        if live is None or not _same_structure(live, target.state["kasmina"]["manifest"]):
            self.kasmina.load_state_dict(target.state["kasmina"])

    def confirm(self, target: Snapshot) -> bool:
        return _same_structure(self.kasmina.manifest(), target.state["kasmina"]["manifest"])

    def abort(self, target: Snapshot) -> None:
        """Nothing to undo that would help: the escalation restores from disk."""
        self._prepared = None


# How the Tolaria participant restored tensors, fastest first: through the snapshot's
# RestorePlan, paired by name (same structure, plan unusable), or structure + optimizer rebuilt.
RESTORE_PATHS = ("planned copy", "copy by name", "rebuilt")


class TolariaParticipant:
    """Weights, optimizer, LR, aggregator, breakers, RNG, data position, counters.

    When the structure did not change since the snapshot, tensors are copied in place with one
    `_foreach_copy_`: through the snapshot's `RestorePlan` when it still resolves, else paired by
    name (`restore_tensors_`). Only when the structure changed is the optimizer rebuilt. Which
    parameters are frozen is part of the structure: the optimizer holds only trainable ones, so a
    fossilization between the snapshot and now shows as different groups and takes the rebuild,
    which loads the snapshot's state by name (momentum included) for the snapshot's structure.
    """

    name = "tolaria"

    def __init__(self, *, registry: StateRegistry, model: nn.Module, optim: DynamicOptimizerManager,
                 position: TrainerState, settle: Callable[[], None]) -> None:
        self.registry, self.model, self.optim, self.position, self.settle = registry, model, optim, position, settle
        self._copied: tuple[list[torch.Tensor], list[torch.Tensor], list[int]] | None = None
        self.last_restore = ""  # how the last commit restored tensors: RESTORE_PATHS

    def prepare(self, target: Snapshot) -> bool:
        # Copy-behind: the last snapshot's job reads the live tensors this rollback is about to
        # write, and the target itself holds its values only once its own job has finished.
        self.settle()
        try:
            target.wait_ready()
        except SnapshotCopyError:
            return False
        return all(k in target.state for k in ("model", "optimizer", "lr", "rng", "trainer"))

    def commit(self, target: Snapshot) -> None:
        self._copied, self.last_restore = None, ""
        pairs = self._planned_pairs(target)
        if pairs is not None:
            self._copy_planned(target, *pairs)
            self._restore_rest(target, structure=False)
            self.last_restore = "planned copy"
            return
        in_place = self._copy_by_name(target)
        self._restore_rest(target, structure=not in_place)
        self.last_restore = "copy by name" if in_place else "rebuilt"

    def _restore_rest(self, target: Snapshot, *, structure: bool) -> None:
        # Kasmina and Tamiyo restore their own sections as participants.
        skip = ("kasmina", "tamiyo") if structure else ("model", "optimizer", "kasmina", "tamiyo")
        self.registry.restore(target.state, rewind=True, skip=skip)

    def _planned_pairs(self, target: Snapshot) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        plan: RestorePlan | None = target.restore_plan
        optimizer = self.optim.optimizer
        saved_groups = target.state["optimizer"]["groups"]
        if plan is None or [g["name"] for g in optimizer.param_groups] != [g["name"] for g in saved_groups]:
            return None
        return plan.resolve(optimizer)

    def _copy_planned(self, target: Snapshot, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        versions = copy_in_place_(dst, src)
        _restore_group_hyper(self.optim.optimizer, target.state["optimizer"]["groups"])
        self._copied = (dst, src, versions)

    def _copy_by_name(self, target: Snapshot) -> bool:
        live = {"model": self.model.state_dict(), "optimizer": self.optim.state_dict()["state"]}
        snap = {"model": target.state["model"], "optimizer": target.state["optimizer"]["state"]}
        try:
            restore_tensors_(live, snap, verify=False)
        except RestoreError:
            return False
        saved_groups = target.state["optimizer"]["groups"]
        if [g["param_names"] for g in self.optim.state_dict()["groups"]] != [g["param_names"] for g in saved_groups]:
            return False
        _restore_group_hyper(self.optim.optimizer, saved_groups)
        return True

    def confirm(self, target: Snapshot) -> bool:
        if self.position.global_step != target.state["trainer"]["global_step"]:
            return False
        if self._copied is not None:  # the planned copy: every tensor written, sampled bits equal
            dst, src, versions = self._copied
            self._copied = None
            return confirm_restored(dst, src, versions) == ""
        live = self.model.state_dict()
        saved = target.state["model"]
        if live.keys() != saved.keys():
            return False
        # Sampled raw bits of the first and last tensors: proves the copy took effect without a
        # checksum that would cost more than the copy (tests prove bit-exactness with state_checksum).
        keys = list(live)
        return all(samples_equal(live[k], saved[k]) for k in {keys[0], keys[-1]})

    def abort(self, target: Snapshot) -> None:
        """See the module docstring."""
        self._copied = None


class TamiyoParticipant:
    name = "tamiyo"

    def __init__(self, tamiyo: StatefulComponent | None) -> None:
        self.tamiyo = tamiyo  # None: the controller keeps no state of its own

    def prepare(self, target: Snapshot) -> bool:
        return "tamiyo" in target.state

    def commit(self, target: Snapshot) -> None:
        state = target.state.get("tamiyo")
        if state is not None and self.tamiyo is not None:
            self.tamiyo.load_state_dict(state)

    def confirm(self, target: Snapshot) -> bool:
        state = target.state.get("tamiyo")
        if state is None or self.tamiyo is None:
            return True
        live = self.tamiyo.state_dict()
        return live == state or _manifest_json(live) == _manifest_json(state)

    def abort(self, target: Snapshot) -> None:
        """Tamiyo's history is advisory; a full rollback restores it with everything else."""


def _restore_group_hyper(optimizer: torch.optim.Optimizer, saved_groups: list[dict[str, Any]]) -> None:
    """Put back each group's saved hyperparameters: not the LR (the LR controller owns it), and not the
    implementation flags (fused, foreach, ...), which are the live optimizer's choice for its device."""
    for group, saved in zip(optimizer.param_groups, saved_groups, strict=True):
        for key, value in saved["hyper"].items():
            if key not in IMPLEMENTATION_KEYS and group.get(key) != value:
                group[key] = value
