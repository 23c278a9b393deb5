"""The dynamic optimizer manager: one owner of the current optimizer, rebuilt as the model grows.

Every component asks `manager.optimizer` for the optimizer; nobody keeps their own reference
across a boundary. Param groups: `"host"` holds every trainable parameter outside
`kasmina_seeds.`; each seed gets one group named by its seed id, holding the parameters named
`kasmina_seeds.<seed_id>.…` (Kasmina's naming; seed ids contain no dot). Each group carries
`"name"` and `"param_names"`.

The one rule for frozen parameters (`requires_grad=False`, e.g. a fossilized seed): they are in
no group and have no state. Freezing is a structural change (`ApplyResult.frozen_params`) and
rebuilds the optimizer, which drops the frozen group and its state and keeps every other
group's; snapshots therefore never hold state for a frozen parameter, and a restore drops any
such state it is given (checkpoints written before this rule) instead of failing on it.

`rebuild(added, removed, reshaped, frozen)` runs in two phases:

1. prepare: build a new optimizer from `model.named_parameters()` with the factory, carry the
   per-parameter state (step, exp_avg, exp_avg_sq, momentum_buffer, square_avg, …) by parameter
   *name*, resize the state of reshaped parameters, and validate the result.
2. swap: replace the optimizer, unregister removed seed groups from the LR controller, register
   new ones with `seed_policy_factory(seed_id)`, and let the controller write their LRs.

Kept state moves by *reference*, not by copy: prepare never mutates the old optimizer or its
tensors (resizing allocates new ones), so a failed prepare leaves the old optimizer exactly as
it was, and after a swap the old optimizer is dropped, so nothing else writes those tensors.
Any failure returns `RebuildResult(ok=False, reason=...)` and keeps the old optimizer; rebuild
never raises into the training loop.

Loaded state (a resume, a rollback that changed the structure) lands where the optimizer reads
it, whatever device the snapshot or checkpoint held it on: per-element state on its
parameter's device in its dtype, `step` as float32 on that device for a fused or capturable
group and as a CPU scalar otherwise (torch's own placement).

Reshape rule (`resize_state_tensor`): the overlapping leading region is kept; new entries are 0
(zero moments, zero momentum); contracting slices. A state tensor is resized along the axes it
follows (`follows_axes`: per-element moments, or a factored second moment such as Adafactor's
row and column variances, whose size-1 axes stay 1). Scalar state (Adam's `step`) is kept as it
is; any other layout cannot be resized, and the rebuild fails naming it.

Loading checks each parameter's saved shape (`param_shapes` in `state_dict`) against the
parameter's, so state of any layout loads; a snapshot without shapes (written before they were
recorded) falls back to checking that each state tensor follows the parameter's axes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esper.tolaria.control.lr import HOST_GROUP, BasePolicy, UnifiedLRController, parse_policy

SEED_PREFIX = "kasmina_seeds."
_STRUCTURAL_KEYS = ("params", "param_names", "name")
# How the optimizer computes, not what: always the factory's (a checkpoint written by a CPU run
# names the CPU's kernels; resumed on a GPU, the factory's fused or capturable choice must hold).
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")

PolicySpec = BasePolicy | Mapping[str, Any]
"""A policy object, or its config mapping with a `kind` key (see `esper.tolaria.control.lr.parse_policy`)."""

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


class RebuildError(RuntimeError):
    """A prepared optimizer failed validation; the message names the parameter and the fix."""


@dataclass(frozen=True)
class RebuildResult:
    """What `rebuild` did. `ok=False`: the old optimizer is still in place, unchanged."""

    ok: bool
    reason: str
    added_groups: tuple[str, ...] = ()
    removed_groups: tuple[str, ...] = ()
    carried_params: int = 0
    duration_ms: float = 0.0


def group_name_for(param_name: str) -> str:
    """`"host"`, or the seed id for a parameter named `kasmina_seeds.<seed_id>.…`."""
    if param_name.startswith(SEED_PREFIX):
        return param_name[len(SEED_PREFIX) :].split(".", 1)[0]
    return HOST_GROUP


def resize_state_tensor(old: torch.Tensor, new_shape: Sequence[int]) -> torch.Tensor:
    """A tensor of `new_shape` holding `old`'s overlapping leading region, zeros elsewhere.

    Contract: same number of dimensions; `result[:m0, :m1, …] == old[:m0, :m1, …]` with
    `m_k = min(old.shape[k], new_shape[k])`; every other entry is 0. `old` is not modified.
    """
    shape = tuple(int(s) for s in new_shape)
    if len(shape) != old.dim():
        raise ValueError(
            f"cannot resize optimizer state from shape {tuple(old.shape)} to {shape}: the number of dimensions "
            "differs; reshape a parameter only along existing dimensions, or remove and add it instead"
        )
    out = torch.zeros(shape, dtype=old.dtype, device=old.device)
    region = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, shape, strict=True))
    out[region] = old[region]
    return out


def follows_axes(state_shape: Sequence[int], param_shape: Sequence[int]) -> bool:
    """State laid out along the parameter's axes: its number of dimensions, each size the
    parameter's or 1 (per-element state, or state factored over some axes)."""
    return len(state_shape) == len(param_shape) and all(s in (p, 1) for s, p in zip(state_shape, param_shape,
                                                                                       strict=True))


class DynamicOptimizerManager:
    """Owns the optimizer for a growing model (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        factory: OptimizerFactory,
        lr: UnifiedLRController,
        *,
        host_policy: PolicySpec,
        seed_policy_factory: Callable[[str], PolicySpec],
    ) -> None:
        self.model = model
        self._factory = factory
        self._lr = lr
        self._host_policy = host_policy
        self._seed_policy_factory = seed_policy_factory
        self.rebuilds = 0
        self.failed_rebuilds = 0
        self._trainable_for: object = None  # the optimizer `_trainable_cache` was read from
        self._trainable_cache: dict[str, nn.Parameter] = {}
        groups = _collect_groups(model)
        optimizer = factory(_group_dicts(groups, {}))
        _check_partition(optimizer, groups)
        policies = self._policies_for(set(groups))
        self._optimizer = optimizer
        self._shapes = _shapes(groups)
        # No refresh here: the controller's optimizer provider may not reach this manager yet.
        self._sync_lr_groups(policies, set(), refresh=False)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The current optimizer; ask again after every rebuild."""
        return self._optimizer

    def group_names(self) -> list[str]:
        return [str(g["name"]) for g in self._optimizer.param_groups]

    # -- rebuild ----------------------------------------------------------------------------
    def named_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters the optimizer holds (the trainable ones), by name."""
        return {n: p for g in self._optimizer.param_groups for n, p in zip(g["param_names"], g["params"], strict=True)}

    def trainable(self) -> dict[str, nn.Parameter]:
        """`named_parameters()`, re-read only when the optimizer was replaced (growth, fossilize,
        cull, restore): the step asks every time, and building the dict costs microseconds."""
        optimizer = self._optimizer
        if self._trainable_for is not optimizer:
            self._trainable_cache, self._trainable_for = self.named_parameters(), optimizer
        return self._trainable_cache

    def rebuild(self, added: Sequence[str], removed: Sequence[str], reshaped: Sequence[str] = (),
                frozen: Sequence[str] = ()) -> RebuildResult:
        """Rebuild for Kasmina's parameter change (names from `ApplyResult`); never raises."""
        start = time.perf_counter()
        old_groups = set(self.group_names())
        try:
            optimizer, groups, carried = self._prepare(added, removed, reshaped, frozen)
            policies = self._policies_for(set(groups) - old_groups)  # a bad seed policy fails here, not half-swapped
        except (RebuildError, RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
            self.failed_rebuilds += 1
            return RebuildResult(
                ok=False,
                reason=f"optimizer rebuild failed, old optimizer kept: {exc}",
                duration_ms=(time.perf_counter() - start) * 1e3,
            )
        self._optimizer = optimizer
        self._shapes = _shapes(groups)
        self.rebuilds += 1
        new_groups = set(groups)
        self._sync_lr_groups(policies, old_groups - new_groups)
        return RebuildResult(
            ok=True,
            reason="rebuilt",
            added_groups=tuple(sorted(new_groups - old_groups)),
            removed_groups=tuple(sorted(old_groups - new_groups)),
            carried_params=carried,
            duration_ms=(time.perf_counter() - start) * 1e3,
        )

    def _prepare(
        self, added: Sequence[str], removed: Sequence[str], reshaped: Sequence[str], frozen: Sequence[str]
    ) -> tuple[torch.optim.Optimizer, dict[str, list[tuple[str, nn.Parameter]]], int]:
        groups = _collect_groups(self.model)
        current = {n: p for members in groups.values() for n, p in members}
        _check_change(current, {n for n, _ in self.model.named_parameters()}, self._shapes,
                      _Change(added, removed, reshaped, frozen))
        optimizer = self._factory(_group_dicts(groups, _hyperparameters(self._optimizer)))
        _check_partition(optimizer, groups)
        old_state = _state_by_name(self._optimizer)
        carried = 0
        reshaped_set = set(reshaped)
        for name, param in current.items():
            state = old_state.get(name)
            if not state:
                continue
            if name in reshaped_set:
                state = _resize_state(name, state, self._shapes[name], param.shape)
            optimizer.state[param] = dict(state)  # a new dict; the tensors move by reference
            carried += 1
        return optimizer, groups, carried

    def _policies_for(self, names: set[str]) -> dict[str, BasePolicy]:
        """The LR policy of each new group, validated before anything is swapped in."""
        registered = self._lr.groups()
        policies = {}
        for name in sorted(names - set(registered)):
            spec = self._host_policy if name == HOST_GROUP else self._seed_policy_factory(name)
            policies[name] = spec if isinstance(spec, BasePolicy) else parse_policy(spec)
        return policies

    def _sync_lr_groups(self, added: Mapping[str, BasePolicy], removed: set[str], *, refresh: bool = True) -> None:
        registered = self._lr.groups()
        for name in sorted(removed):
            if name in registered:
                self._lr.unregister_group(name)
        for name, policy in added.items():
            self._lr.register_group(name, policy)
        if refresh:
            self._lr.refresh()

    # -- snapshots ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Optimizer state keyed by parameter NAME, plus each group's hyperparameters (not its LR,
        which the LR controller derives). Tensors are references: snapshot code clones them."""
        groups = []
        for g in self._optimizer.param_groups:
            hyper = {k: v for k, v in g.items() if k not in _STRUCTURAL_KEYS and k != "lr"}
            groups.append({"name": g["name"], "param_names": list(g["param_names"]),
                           "param_shapes": [list(p.shape) for p in g["params"]], "hyper": hyper})
        state = {name: dict(s) for name, s in _state_by_name(self._optimizer).items()}
        return {"groups": groups, "state": state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Rebuild the optimizer for the model as it is now and load saved state by name.

        The model must already have its saved structure (Kasmina's manifest loaded first).
        State is matched by name against the trainable parameters; state saved for a parameter
        that is frozen now is dropped (frozen parameters hold none, see the module docstring).
        Tensors are cloned, so the saved state (e.g. a rollback snapshot) is never mutated."""
        groups = _collect_groups(self.model)
        current = {n: p for members in groups.values() for n, p in members}
        in_model = {n for n, _ in self.model.named_parameters()}
        saved_state = {n: s for n, s in state["state"].items() if n in current or n not in in_model}
        missing = sorted(set(saved_state) - set(current))
        if missing:
            raise ValueError(
                f"optimizer state names parameters the model lacks: {missing[:5]}; "
                "restore the model's structure (Kasmina manifest) before loading optimizer state"
            )
        hyper = {str(g["name"]): dict(g["hyper"]) for g in state["groups"]}
        optimizer = self._factory(_group_dicts(groups, hyper))
        _check_partition(optimizer, groups)
        on_device = _steps_on_device(optimizer)
        saved_shapes = _saved_shapes(state["groups"])
        for name, entry in saved_state.items():
            param = current[name]
            _check_saved_shape(name, entry, saved_shapes.get(name), param)
            optimizer.state[param] = _load_entry(entry, param, step_on_device=id(param) in on_device)
        old_groups = set(self.group_names())
        policies = self._policies_for(set(groups) - old_groups)
        self._optimizer = optimizer
        self._shapes = _shapes(groups)
        self._sync_lr_groups(policies, old_groups - set(groups))


# -- helpers ------------------------------------------------------------------------------------
def _collect_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by group, host first, seeds in model order."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {HOST_GROUP: []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = group_name_for(name)
        if group == HOST_GROUP and name.startswith(SEED_PREFIX):
            raise RebuildError(f"seed id 'host' in {name!r} collides with the host group; rename the seed")
        groups.setdefault(group, []).append((name, param))
    if not groups[HOST_GROUP]:
        del groups[HOST_GROUP]
    return groups


def _group_dicts(
    groups: Mapping[str, list[tuple[str, nn.Parameter]]], hyper: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Param-group dicts for the factory; kept groups carry their previous hyperparameters
    (e.g. an adjusted weight decay), new groups get the factory's defaults."""
    out = []
    for name, members in groups.items():
        extra = {k: v for k, v in hyper.get(name, {}).items()
                 if k not in _STRUCTURAL_KEYS and k not in IMPLEMENTATION_KEYS}
        out.append({**extra, "params": [p for _, p in members], "param_names": [n for n, _ in members], "name": name})
    return out


def _hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    return {str(g["name"]): {k: v for k, v in g.items() if k not in _STRUCTURAL_KEYS} for g in optimizer.param_groups}


def _shapes(groups: Mapping[str, list[tuple[str, nn.Parameter]]]) -> dict[str, torch.Size]:
    return {n: p.shape for members in groups.values() for n, p in members}


def _state_by_name(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for g in optimizer.param_groups:
        for name, param in zip(g["param_names"], g["params"], strict=True):
            state = optimizer.state.get(param)
            if state:
                out[name] = state
    return out


@dataclass(frozen=True)
class _Change:
    added: Sequence[str]
    removed: Sequence[str]
    reshaped: Sequence[str]
    frozen: Sequence[str]


def _check_change(
    current: Mapping[str, nn.Parameter], in_model: set[str], old_shapes: Mapping[str, torch.Size], change: _Change
) -> None:
    """`current`: the trainable parameters now; `in_model`: every parameter name now."""
    for name in change.added:
        if name not in in_model:
            raise RebuildError(f"added parameter {name!r} is not a trainable model parameter (nor a frozen one); "
                               "apply the change first")
    for name in change.removed:
        if name in in_model:
            raise RebuildError(f"removed parameter {name!r} is still in the model; remove it before rebuilding")
    for name in change.frozen:
        if name not in in_model or name in current:
            raise RebuildError(f"frozen parameter {name!r} is not a frozen model parameter; set requires_grad=False "
                               "on it before rebuilding")
    reshaped = change.reshaped
    for name in reshaped:
        if name not in current or name not in old_shapes:
            raise RebuildError(f"reshaped parameter {name!r} must exist before and after the change")
    reshaped_set = set(reshaped)
    for name, param in current.items():
        before = old_shapes.get(name)
        if before is not None and before != param.shape and name not in reshaped_set:
            raise RebuildError(
                f"parameter {name!r} changed shape {tuple(before)} -> {tuple(param.shape)} but is not in "
                "`reshaped`; list it there so its optimizer state is resized"
            )


def _check_partition(optimizer: torch.optim.Optimizer, groups: Mapping[str, list[tuple[str, nn.Parameter]]]) -> None:
    """Every trainable parameter is in exactly one group, under its own name and group."""
    expected = {id(p): (n, g) for g, members in groups.items() for n, p in members}
    seen: set[int] = set()
    for group in optimizer.param_groups:
        names = group.get("param_names")
        if "name" not in group or names is None or len(names) != len(group["params"]):
            raise RebuildError("the optimizer factory dropped a group's 'name'/'param_names'; pass groups through")
        for name, param in zip(names, group["params"], strict=True):
            if id(param) in seen:
                raise RebuildError(f"parameter {name!r} is in more than one optimizer group")
            if expected.get(id(param)) != (name, group["name"]):
                raise RebuildError(f"parameter {name!r} is misplaced in group {group['name']!r}")
            seen.add(id(param))
    if len(seen) != len(expected):
        lost = sorted(n for i, (n, _) in expected.items() if i not in seen)
        raise RebuildError(f"trainable parameters missing from the optimizer: {lost[:5]}")


def _resize_state(name: str, state: Mapping[str, Any], old_shape: torch.Size,
                  new_shape: torch.Size) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            out[key] = value
        elif follows_axes(value.shape, old_shape):
            # per-element state takes the new shape; a factored axis (size 1) stays 1
            target = new_shape if value.shape == old_shape else [
                n if s == o else s for s, o, n in zip(value.shape, old_shape, new_shape, strict=True)]
            out[key] = resize_state_tensor(value, target)
        else:
            raise RebuildError(
                f"state {key!r} of {name!r} has shape {tuple(value.shape)}, which does not follow the parameter's "
                f"axes {tuple(old_shape)}, so it cannot be resized with it; remove the parameter and add it anew "
                "instead of reshaping it"
            )
    return out


def _steps_on_device(optimizer: torch.optim.Optimizer) -> set[int]:
    """Ids of the parameters whose `step` the optimizer reads on their device (fused or capturable groups)."""
    return {id(p) for g in optimizer.param_groups if g.get("fused") or g.get("capturable") for p in g["params"]}


def _saved_shapes(groups: Sequence[Mapping[str, Any]]) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape when its state was saved (none from a snapshot written before shapes were kept)."""
    return {n: tuple(s) for g in groups for n, s in zip(g["param_names"], g.get("param_shapes", ()), strict=False)}


def _check_saved_shape(name: str, entry: Mapping[str, Any], saved: tuple[int, ...] | None,
                       param: nn.Parameter) -> None:
    """State saved for another shape of the parameter would fail (or silently misapply) at the next step."""
    if saved is not None:
        if saved != tuple(param.shape):
            raise ValueError(_shape_error(repr(name), saved, param))
        return
    for key, value in entry.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and not follows_axes(value.shape, param.shape):
            raise ValueError(_shape_error(f"{name!r} ({key!r})", tuple(value.shape), param))


def _shape_error(what: str, shape: tuple[int, ...], param: nn.Parameter) -> str:
    return (f"saved optimizer state of {what} has shape {shape}, the parameter {tuple(param.shape)}; restore the "
            "model's structure (Kasmina manifest) before loading optimizer state")


def _load_entry(entry: Mapping[str, Any], param: nn.Parameter, *, step_on_device: bool) -> dict[str, Any]:
    """One parameter's saved state as its optimizer expects it, in new tensors (the saved ones, a
    snapshot's host copies, are never aliased): per-element state on the parameter's device in its
    dtype, `step` where torch keeps it."""
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
        elif key == "step":
            out[key] = _step_tensor(value, param, on_device=step_on_device)
        else:
            dtype = param.dtype if value.is_floating_point() else value.dtype
            out[key] = value.detach().to(device=param.device, dtype=dtype, copy=True)
    return out


def _step_tensor(value: torch.Tensor, param: nn.Parameter, *, on_device: bool) -> torch.Tensor:
    """A fused or capturable optimizer reads `step` on the parameter's device as float32; any other
    keeps it as a CPU scalar in its own dtype, as torch creates it (read on a GPU, every step
    would wait for the device)."""
    if on_device:
        return value.detach().to(device=param.device, dtype=torch.float32, copy=True)
    return value.detach().to(device="cpu", copy=True)
