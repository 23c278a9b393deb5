"""DynamicOptimizerManager's contract in detail: what a rebuild reports and counts, what a snapshot
holds, how state of other layouts (Adafactor's factored moments) survives growth, reshape and resume,
and that a bad policy or a stale shape fails before anything is swapped."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esper.tolaria.control.lr import ConstantPolicy, SeedWarmupPolicy, UnifiedLRController
from esper.tolaria.control.optimizer import DynamicOptimizerManager, follows_axes, resize_state_tensor
from optim.toy import ToySeeded, batch

Factory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


def sgd(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=0.01, momentum=0.9, weight_decay=0.01)


def adafactor(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(groups, lr=0.01)


def manager_for(model: nn.Module, factory: Factory,
                seed_policy: Callable[[str], Any] = lambda _s: SeedWarmupPolicy(warmup_steps=5),
                ) -> tuple[DynamicOptimizerManager, UnifiedLRController]:
    holder: list[DynamicOptimizerManager] = []
    ctl = UnifiedLRController(lambda: holder[0].optimizer)
    holder.append(DynamicOptimizerManager(model, factory, ctl, host_policy=ConstantPolicy(lr=0.01),
                                          seed_policy_factory=seed_policy))
    return holder[0], ctl


def train(model: nn.Module, manager: DynamicOptimizerManager, ctl: UnifiedLRController, steps: range) -> None:
    for step in steps:
        x, y = batch(seed=step)
        manager.optimizer.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        ctl.step(step)
        manager.optimizer.step()


def grow_head(model: ToySeeded, rows: int) -> None:
    """Give the head `rows` outputs, keeping the old rows' weights (a reshape of head.weight and head.bias)."""
    with torch.no_grad():
        weight = torch.zeros(rows, model.d_hidden)
        weight[: model.head.weight.shape[0]] = model.head.weight
        bias = torch.zeros(rows)
        bias[: model.head.bias.shape[0]] = model.head.bias
    model.head.weight, model.head.bias = nn.Parameter(weight), nn.Parameter(bias)


# -- resize and axes ------------------------------------------------------------------------------
def test_a_resized_state_keeps_its_dtype_and_device() -> None:
    old = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    grown = resize_state_tensor(old, (3, 3))
    assert grown.dtype == torch.float64 and torch.equal(grown[:2], old) and torch.equal(grown[2], torch.zeros(3,
                                                                                       dtype=torch.float64))
    on_meta = resize_state_tensor(torch.empty(2, 3, device="meta"), (4, 3))
    assert on_meta.device.type == "meta" and on_meta.shape == (4, 3)


@pytest.mark.parametrize(("state", "param", "follows"), [
    ((16, 8), (16, 8), True),       # per-element
    ((16, 1), (16, 8), True),       # Adafactor's row variance
    ((1, 8), (16, 8), True),        # its column variance
    ((8, 8), (16, 8), False),       # a preconditioner: another layout
    ((16,), (16, 8), False),        # fewer dimensions
    ((16, 8, 1), (16, 8), False),   # more dimensions
])
def test_follows_axes_means_the_parameters_dimensions_each_its_size_or_one(
        state: tuple[int, ...], param: tuple[int, ...], follows: bool) -> None:
    assert follows_axes(state, param) is follows


# -- Adafactor: factored state through growth, reshape and resume ---------------------------------
def test_adafactor_state_is_carried_when_a_seed_is_added() -> None:
    torch.manual_seed(0)
    model = ToySeeded()
    manager, ctl = manager_for(model, adafactor)
    train(model, manager, ctl, range(3))
    before = copy.deepcopy(manager.state_dict()["state"])
    result = manager.rebuild(added=model.add_seed("a"), removed=())
    assert result.ok, result.reason
    after = manager.state_dict()["state"]
    for name, state in before.items():
        assert set(after[name]) == set(state)
        assert all(torch.equal(after[name][k], v) for k, v in state.items()), name
    train(model, manager, ctl, range(3, 5))  # the grown model keeps stepping


def test_a_reshaped_adafactor_parameter_resizes_its_factors_along_their_axes() -> None:
    torch.manual_seed(1)
    model = ToySeeded()
    manager, ctl = manager_for(model, adafactor)
    train(model, manager, ctl, range(2))
    old = copy.deepcopy(manager.state_dict()["state"]["head.weight"])
    grow_head(model, 6)
    result = manager.rebuild(added=(), removed=(), reshaped=("head.weight", "head.bias"))
    assert result.ok, result.reason
    new = manager.state_dict()["state"]["head.weight"]
    assert new["row_var"].shape == (6, 1) and new["col_var"].shape == (1, 16)
    assert torch.equal(new["row_var"][:4], old["row_var"]) and not new["row_var"][4:].any()
    assert torch.equal(new["col_var"], old["col_var"]) and torch.equal(new["step"], old["step"])
    assert manager.state_dict()["state"]["head.bias"]["variance"].shape == (6,)
    x, y = batch(seed=2)
    F.mse_loss(model(x)[:, :4], y).backward()
    manager.optimizer.step()  # Adafactor accepts the resized factors
    assert manager.state_dict()["state"]["head.weight"]["step"] == old["step"] + 1


def test_adafactor_resumes_bit_exactly_from_its_saved_state() -> None:
    torch.manual_seed(2)
    model = ToySeeded()
    model.add_seed("a")
    manager, ctl = manager_for(model, adafactor)
    train(model, manager, ctl, range(3))
    saved, saved_lr, twin = copy.deepcopy(manager.state_dict()), ctl.state_dict(), copy.deepcopy(model)
    twin_manager, twin_ctl = manager_for(twin, adafactor)
    twin_ctl.load_state_dict(saved_lr)
    twin_manager.load_state_dict(saved)
    train(model, manager, ctl, range(3, 6))
    train(twin, twin_manager, twin_ctl, range(3, 6))
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_state_of_a_layout_that_cannot_follow_a_reshape_fails_the_rebuild_and_names_it() -> None:
    model = ToySeeded()
    manager, ctl = manager_for(model, sgd)
    train(model, manager, ctl, range(1))
    old = manager.optimizer
    old.state[model.head.weight]["preconditioner"] = torch.eye(16)
    grow_head(model, 6)
    result = manager.rebuild(added=(), removed=(), reshaped=("head.weight", "head.bias"))
    assert result.ok is False and manager.optimizer is old
    assert "'preconditioner' of 'head.weight'" in result.reason and "cannot be resized" in result.reason


# -- loading: shapes ---------------------------------------------------------------------------------
def test_a_snapshot_records_each_parameters_shape_and_a_load_refuses_another_shape() -> None:
    model = ToySeeded()
    manager, ctl = manager_for(model, sgd)
    train(model, manager, ctl, range(1))
    saved = copy.deepcopy(manager.state_dict())
    host = saved["groups"][0]
    assert host["param_shapes"] == [list(p.shape) for p in manager.optimizer.param_groups[0]["params"]]
    grow_head(model, 6)  # the model now differs from the snapshot
    with pytest.raises(ValueError, match=r"'head.weight' has shape \(4, 16\), the parameter \(6, 16\).*Kasmina"):
        manager.load_state_dict(saved)


def test_a_snapshot_without_shapes_still_loads_and_still_refuses_state_that_does_not_fit() -> None:
    model = ToySeeded()
    manager, ctl = manager_for(model, adafactor)
    train(model, manager, ctl, range(1))
    saved = copy.deepcopy(manager.state_dict())
    for group in saved["groups"]:
        del group["param_shapes"]  # written before shapes were recorded
    manager.load_state_dict(saved)  # factored state follows the axes: accepted
    saved["state"]["head.weight"]["row_var"] = torch.zeros(3, 1)
    with pytest.raises(ValueError, match=r"'head.weight' \('row_var'\) has shape \(3, 1\)"):
        manager.load_state_dict(saved)


def test_state_of_a_parameter_the_model_lacks_is_listed_five_names_at_most() -> None:
    model = ToySeeded()
    for seed in "abc":
        model.add_seed(seed)
    manager, ctl = manager_for(model, sgd)
    train(model, manager, ctl, range(1))
    saved = manager.state_dict()
    fresh, _ = manager_for(ToySeeded(), sgd)
    with pytest.raises(ValueError) as err:
        fresh.load_state_dict(saved)
    listed = str(err.value).split("[", 1)[1].split("]", 1)[0]
    assert listed.count("kasmina_seeds.") == 5  # 12 seed parameters lack a home; five are named


def test_after_a_load_the_next_rebuild_checks_shapes_against_the_loaded_structure() -> None:
    model = ToySeeded()
    manager, ctl = manager_for(model, sgd)
    train(model, manager, ctl, range(1))
    manager.load_state_dict(copy.deepcopy(manager.state_dict()))
    result = manager.rebuild(added=model.add_seed("a"), removed=())
    assert result.ok, result.reason
    grow_head(model, 5)
    unlisted = manager.rebuild(added=(), removed=())
    assert not unlisted.ok and "list it there" in unlisted.reason


# -- snapshot contents ------------------------------------------------------------------------------
def test_a_snapshot_holds_each_groups_hyperparameters_but_not_its_lr_or_structure() -> None:
    model = ToySeeded()
    model.add_seed("a")
    manager, _ = manager_for(model, sgd)
    groups = manager.state_dict()["groups"]
    assert [g["name"] for g in groups] == ["host", "a"]
    assert groups[1]["param_names"] == list(model.seed_param_names("a"))
    hyper = groups[0]["hyper"]
    assert hyper["momentum"] == 0.9 and hyper["weight_decay"] == 0.01
    assert not {"lr", "params", "param_names", "name"} & set(hyper)


def test_a_kept_groups_adjusted_hyperparameters_survive_a_rebuild() -> None:
    model = ToySeeded()
    manager, _ = manager_for(model, sgd)
    manager.optimizer.param_groups[0]["weight_decay"] = 0.25
    assert manager.rebuild(added=model.add_seed("a"), removed=()).ok
    host, seed = manager.optimizer.param_groups
    assert host["weight_decay"] == 0.25 and seed["weight_decay"] == 0.01  # new groups: the factory's


# -- rebuild reporting ------------------------------------------------------------------------------
def test_rebuilds_are_counted_and_timed_in_milliseconds() -> None:
    model = ToySeeded()
    slow_calls = {"n": 0}

    def slow_sgd(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        slow_calls["n"] += 1
        if slow_calls["n"] > 1:
            time.sleep(0.03)
        return sgd(groups)

    manager, _ = manager_for(model, slow_sgd)
    first = manager.rebuild(added=model.add_seed("a"), removed=())
    second = manager.rebuild(added=model.add_seed("b"), removed=())
    assert first.ok is True and first.reason == "rebuilt" and manager.rebuilds == 2
    assert 30.0 <= second.duration_ms < 30_000.0


def test_failed_rebuilds_are_counted_each_and_timed() -> None:
    model = ToySeeded()
    manager, _ = manager_for(model, sgd)
    model.head.bias = nn.Parameter(torch.zeros(6))  # an unlisted reshape: every rebuild fails
    results = [manager.rebuild(added=(), removed=()) for _ in range(2)]
    assert [r.ok for r in results] == [False, False] and manager.failed_rebuilds == 2 and manager.rebuilds == 0
    assert all(0.0 <= r.duration_ms < 30_000.0 for r in results)


def test_a_bad_seed_policy_fails_the_rebuild_before_anything_is_swapped() -> None:
    model = ToySeeded()
    manager, ctl = manager_for(model, sgd, seed_policy=lambda _s: {"kind": "no_such_policy"})
    old = manager.optimizer
    result = manager.rebuild(added=model.add_seed("a"), removed=())
    assert result.ok is False and "old optimizer kept" in result.reason and "no_such_policy" in result.reason
    assert manager.optimizer is old and manager.group_names() == ["host"] and set(ctl.groups()) == {"host"}
    assert manager.failed_rebuilds == 1 and manager.rebuilds == 0


def test_trainable_is_cached_per_optimizer_and_follows_every_rebuild() -> None:
    model = ToySeeded()
    manager, _ = manager_for(model, sgd)
    first = manager.trainable()
    assert first == manager.named_parameters() and set(first) == {n for n, _ in model.named_parameters()}
    assert manager.trainable() is first  # read once per optimizer
    assert manager.rebuild(added=model.add_seed("a"), removed=()).ok
    grown = manager.trainable()
    assert grown is not first and set(grown) == {n for n, _ in model.named_parameters()}
