"""DynamicOptimizerManager: rebuilds keep per-parameter state by name; failures keep the old one."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from esper.tolaria.control.lr import ConstantPolicy, SeedWarmupPolicy, UnifiedLRController
from esper.tolaria.control.optimizer import DynamicOptimizerManager, group_name_for, resize_state_tensor
from optim.toy import ToySeeded, batch

Factory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
FACTORIES: dict[str, Factory] = {
    "sgd_momentum": lambda groups: torch.optim.SGD(groups, lr=0.01, momentum=0.9),
    "adam": lambda groups: torch.optim.Adam(groups, lr=0.01),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=0.01, weight_decay=0.05),
    "rmsprop": lambda groups: torch.optim.RMSprop(groups, lr=0.01, momentum=0.5, centered=True),
}


def _manager(model: nn.Module, factory: Factory) -> tuple[DynamicOptimizerManager, UnifiedLRController]:
    holder: list[DynamicOptimizerManager] = []
    ctl = UnifiedLRController(lambda: holder[0].optimizer)
    manager = DynamicOptimizerManager(
        model,
        factory,
        ctl,
        host_policy=ConstantPolicy(lr=0.01),
        seed_policy_factory=lambda seed: SeedWarmupPolicy(warmup_steps=5),
    )
    holder.append(manager)
    return manager, ctl


def _train(model: ToySeeded, manager: DynamicOptimizerManager, ctl: UnifiedLRController, steps: range) -> float:
    loss = torch.tensor(0.0)
    for step in steps:
        x, y = batch(seed=step)
        manager.optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        ctl.step(step)
        manager.optimizer.step()
    return float(loss.detach())


def _state_by_name(manager: DynamicOptimizerManager) -> dict[str, dict[str, Any]]:
    return {n: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for n, s in manager.state_dict()["state"].items()}


def _assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_adding_a_seed_keeps_every_kept_parameters_state_bitwise(kind: str) -> None:
    torch.manual_seed(0)
    model = ToySeeded()
    model.add_seed("a")
    manager, ctl = _manager(model, FACTORIES[kind])
    _train(model, manager, ctl, range(3))
    before = _state_by_name(manager)
    old = manager.optimizer
    added = model.add_seed("b")
    result = manager.rebuild(added=added, removed=())
    assert result.ok, result.reason
    assert result.added_groups == ("b",) and result.carried_params == len(before)
    assert manager.optimizer is not old
    after = manager.state_dict()["state"]
    for name, state in before.items():
        _assert_same_state(state, after[name])
    assert not any(n.startswith("kasmina_seeds.b.") for n in after)
    assert manager.group_names() == ["host", "a", "b"]
    _train(model, manager, ctl, range(3, 5))  # the new optimizer steps under the controller
    assert ctl.drain_violations() == []
    assert "b" in ctl.current()


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_removing_a_seed_keeps_the_others_state_and_unregisters_its_lr(kind: str) -> None:
    torch.manual_seed(1)
    model = ToySeeded()
    model.add_seed("a")
    model.add_seed("b")
    manager, ctl = _manager(model, FACTORIES[kind])
    _train(model, manager, ctl, range(3))
    before = _state_by_name(manager)
    removed = model.remove_seed("a")
    result = manager.rebuild(added=(), removed=removed)
    assert result.ok and result.removed_groups == ("a",)
    after = manager.state_dict()["state"]
    assert set(after) == set(before) - set(removed)
    for name in after:
        _assert_same_state(before[name], after[name])
    assert "a" not in ctl.groups()


def test_group_names_follow_kasmina_naming_and_frozen_params_are_excluded() -> None:
    model = ToySeeded()
    model.add_seed("s7")
    model.stem.bias.requires_grad_(False)
    manager, ctl = _manager(model, FACTORIES["adam"])
    names = {g["name"]: g["param_names"] for g in manager.optimizer.param_groups}
    assert names["host"] == ["stem.weight", "head.weight", "head.bias"]
    assert all(n.startswith("kasmina_seeds.s7.") for n in names["s7"])
    assert group_name_for("kasmina_seeds.s7.0.weight") == "s7" and group_name_for("head.bias") == "host"
    assert set(ctl.groups()) == {"host", "s7"}


def test_failed_factory_keeps_the_old_optimizer_and_its_state() -> None:
    torch.manual_seed(2)
    model = ToySeeded()
    calls = {"n": 0}

    def flaky(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("out of memory (simulated)")
        return torch.optim.Adam(groups, lr=0.01)

    manager, ctl = _manager(model, flaky)
    _train(model, manager, ctl, range(2))
    old, before = manager.optimizer, _state_by_name(manager)
    result = manager.rebuild(added=model.add_seed("a"), removed=())
    assert not result.ok
    assert "old optimizer kept" in result.reason and "out of memory (simulated)" in result.reason
    assert manager.optimizer is old and manager.failed_rebuilds == 1
    for name, state in manager.state_dict()["state"].items():
        _assert_same_state(before[name], state)
    assert "a" not in ctl.groups()


def test_unlisted_shape_change_fails_validation_with_the_fix() -> None:
    model = ToySeeded()
    manager, ctl = _manager(model, FACTORIES["adam"])
    _train(model, manager, ctl, range(1))
    old = manager.optimizer
    model.head.bias = nn.Parameter(torch.zeros(6))
    result = manager.rebuild(added=(), removed=())
    assert not result.ok and "list it there" in result.reason and "head.bias" in result.reason
    assert manager.optimizer is old
    bad = manager.rebuild(added=("kasmina_seeds.ghost.w",), removed=())
    assert not bad.ok and "not a trainable model parameter" in bad.reason


def test_reshaped_parameter_keeps_overlap_and_zero_fills_new_entries() -> None:
    model = ToySeeded()
    manager, ctl = _manager(model, FACTORIES["adam"])
    _train(model, manager, ctl, range(2))
    old = _state_by_name(manager)["head.weight"]
    with torch.no_grad():
        grown = torch.zeros(6, model.d_hidden)
        grown[:4] = model.head.weight
    model.head.weight = nn.Parameter(grown)
    model.head.bias = nn.Parameter(torch.zeros(6))
    result = manager.rebuild(added=(), removed=(), reshaped=("head.weight", "head.bias"))
    assert result.ok, result.reason
    new = manager.state_dict()["state"]["head.weight"]
    assert torch.equal(new["exp_avg"][:4], old["exp_avg"]) and torch.equal(new["exp_avg"][4:], torch.zeros(2, 16))
    assert torch.equal(new["exp_avg_sq"][:4], old["exp_avg_sq"])
    assert torch.equal(new["step"], old["step"])


@settings(max_examples=60, deadline=None)
@given(
    old=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    data=st.data(),
)
def test_resize_state_tensor_keeps_overlap_and_zero_fills(old: list[int], data: st.DataObject) -> None:
    new = data.draw(st.lists(st.integers(1, 5), min_size=len(old), max_size=len(old)))
    tensor = torch.arange(1, 1 + torch.Size(old).numel(), dtype=torch.float32).reshape(old)
    out = resize_state_tensor(tensor, new)
    region = tuple(slice(0, min(a, b)) for a, b in zip(old, new, strict=True))
    assert out.shape == torch.Size(new)
    assert torch.equal(out[region], tensor[region])
    mask = torch.ones(new, dtype=torch.bool)
    mask[region] = False
    assert torch.count_nonzero(out[mask]) == 0
    back = resize_state_tensor(out, old)
    assert torch.equal(back[region], tensor[region])  # expand then contract is the identity on the overlap


def test_resize_state_tensor_rejects_rank_change() -> None:
    with pytest.raises(ValueError, match="number of dimensions differs"):
        resize_state_tensor(torch.zeros(2, 3), (6,))


def test_state_dict_by_name_resumes_a_grown_model_exactly() -> None:
    torch.manual_seed(3)
    model = ToySeeded()
    manager, ctl = _manager(model, FACTORIES["adamw"])
    _train(model, manager, ctl, range(2))
    manager.rebuild(added=model.add_seed("a"), removed=())
    _train(model, manager, ctl, range(2, 4))
    saved_opt, saved_lr = copy.deepcopy(manager.state_dict()), ctl.state_dict()
    twin = copy.deepcopy(model)
    twin_manager, twin_ctl = _manager(twin, FACTORIES["adamw"])
    twin_ctl.load_state_dict(saved_lr)
    twin_manager.load_state_dict(saved_opt)
    _train(model, manager, ctl, range(4, 7))
    _train(twin, twin_manager, twin_ctl, range(4, 7))
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert twin_ctl.drain_violations() == []


def test_load_state_dict_rejects_state_for_parameters_the_model_lacks() -> None:
    model = ToySeeded()
    model.add_seed("a")
    manager, ctl = _manager(model, FACTORIES["adam"])
    _train(model, manager, ctl, range(1))
    saved = manager.state_dict()
    fresh, _ = _manager(ToySeeded(), FACTORIES["adam"])
    with pytest.raises(ValueError, match="Kasmina manifest"):
        fresh.load_state_dict(saved)


def test_growth_run_with_kept_state_ends_no_worse_than_reset_state() -> None:
    def run(keep: bool) -> float:
        torch.manual_seed(4)
        model = ToySeeded(d_hidden=32)
        manager, ctl = _manager(model, FACTORIES["adam"])
        _train(model, manager, ctl, range(40))
        added = model.add_seed("a", alpha=0.1)
        if keep:
            assert manager.rebuild(added=added, removed=()).ok
        else:
            manager, ctl = _manager(model, FACTORIES["adam"])  # fresh optimizer: state reset
        _train(model, manager, ctl, range(40, 60))
        x, y = batch(n=256, seed=999)
        with torch.no_grad():
            return float(F.mse_loss(model(x), y))

    kept, reset = run(keep=True), run(keep=False)
    assert kept <= reset, (kept, reset)
