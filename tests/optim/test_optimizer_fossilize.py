"""Fossilizing a seed: its frozen parameters leave the optimizer by name, every other group keeps
its state, and snapshots of the optimizer restore on either side of the fossilization."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from kasmina.helpers import apply_ok, cmd, drive_to, make_layer  # type: ignore[import-not-found]

from esper.kasmina import KasminaLayer
from esper.leyline import SEED_OP_CULL, SEED_OP_FOSSILIZE, SEED_OP_GERMINATE, SEED_STAGE_PROBATIONARY
from esper.tolaria.control.lr import ConstantPolicy, UnifiedLRController
from esper.tolaria.control.optimizer import DynamicOptimizerManager
from esper.tolaria.state.snapshot import deep_clone


def _manager(layer: KasminaLayer) -> tuple[DynamicOptimizerManager, UnifiedLRController]:
    holder: list[DynamicOptimizerManager] = []
    ctl = UnifiedLRController(lambda: holder[0].optimizer)
    manager = DynamicOptimizerManager(
        layer.model, lambda groups: torch.optim.Adam(groups, lr=0.01), ctl,
        host_policy=ConstantPolicy(lr=0.01), seed_policy_factory=lambda seed: ConstantPolicy(lr=0.005),
    )
    holder.append(manager)
    return manager, ctl


def _train(layer: KasminaLayer, manager: DynamicOptimizerManager, steps: int) -> None:
    generator = torch.Generator().manual_seed(steps)
    for _ in range(steps):
        x, y = torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        manager.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(layer.model(x), y).backward()
        manager.optimizer.step()  # at the factory's LR: these tests are about state, not schedules


def _apply(layer: KasminaLayer, manager: DynamicOptimizerManager, op: int, target: str) -> str:
    """What the trainer does: apply, and rebuild the optimizer when the parameter set changed."""
    result = layer.apply_command(cmd(op, target))
    assert result.ok, result.reason
    if result.structure_changed:
        rebuilt = manager.rebuild(result.added_params, result.removed_params, result.reshaped_params,
                                  result.frozen_params)
        assert rebuilt.ok, rebuilt.reason
    return result.seed_id


def _host_state(manager: DynamicOptimizerManager) -> dict[str, Any]:
    return {n: deep_clone(s) for n, s in manager.state_dict()["state"].items() if not n.startswith("kasmina_seeds.")}


def _trainable(layer: KasminaLayer) -> set[str]:
    return {n for n, p in layer.model.named_parameters() if p.requires_grad}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[n][k], b[n][k]) if isinstance(a[n][k], torch.Tensor) else a[n][k] == b[n][k]
        for n in a for k in a[n])


def _probationary_layer() -> tuple[KasminaLayer, DynamicOptimizerManager, str, UnifiedLRController]:
    torch.manual_seed(0)
    layer = make_layer()
    seed_id = drive_to(layer, SEED_STAGE_PROBATIONARY, slot="1")
    manager, ctl = _manager(layer)
    _train(layer, manager, 3)
    return layer, manager, seed_id, ctl


def test_fossilizing_drops_the_seeds_group_and_state_and_keeps_the_hosts_momentum_bitwise() -> None:
    layer, manager, seed_id, ctl = _probationary_layer()
    assert seed_id in manager.group_names() and seed_id in ctl.groups()
    host_before = _host_state(manager)
    result = layer.apply_command(cmd(SEED_OP_FOSSILIZE, seed_id))
    assert result.ok and result.structure_changed
    assert set(result.frozen_params) == set(layer.param_names(seed_id)) and result.frozen_params
    rebuilt = manager.rebuild(result.added_params, result.removed_params, result.reshaped_params,
                              result.frozen_params)
    assert rebuilt.ok and rebuilt.removed_groups == (seed_id,), rebuilt.reason
    assert manager.group_names() == ["host"] and set(manager.named_parameters()) == _trainable(layer)
    assert _same(host_before, _host_state(manager))  # every moment of the host carried over
    assert set(manager.state_dict()["state"]) == set(host_before)
    assert seed_id not in ctl.groups()  # its LR policy leaves with the group
    _train(layer, manager, 2)  # the rebuilt optimizer steps


def test_a_rebuild_listing_a_still_trainable_parameter_as_frozen_fails_and_keeps_the_optimizer() -> None:
    layer, manager, seed_id, _ = _probationary_layer()
    old = manager.optimizer
    result = manager.rebuild((), (), (), frozen=layer.param_names(seed_id)[:1])
    assert not result.ok and "set requires_grad=False" in result.reason and manager.optimizer is old


def test_optimizer_snapshots_restore_on_both_sides_of_a_fossilization_and_after_a_cull() -> None:
    layer, manager, seed_id, _ = _probationary_layer()
    before = (deep_clone(layer.state_dict()), deep_clone(manager.state_dict()))
    _apply(layer, manager, SEED_OP_FOSSILIZE, seed_id)
    _train(layer, manager, 2)
    other = _apply(layer, manager, SEED_OP_GERMINATE, "3")
    _train(layer, manager, 2)
    host_before_cull = _host_state(manager)
    _apply(layer, manager, SEED_OP_CULL, other)  # a cull after a fossilization
    assert manager.group_names() == ["host"] and _same(host_before_cull, _host_state(manager))
    after = (deep_clone(layer.state_dict()), deep_clone(manager.state_dict()))
    for kasmina, optimizer in (before, after, before):  # back across the fossilization, and forward again
        layer.load_state_dict(kasmina)
        manager.load_state_dict(optimizer)
        assert set(manager.named_parameters()) == _trainable(layer)
        assert _same(optimizer["state"], manager.state_dict()["state"])
        _train(layer, manager, 1)


def test_state_saved_for_a_parameter_that_is_frozen_now_is_dropped_on_restore() -> None:
    # A checkpoint written before frozen parameters left the optimizer holds their state.
    layer, manager, seed_id, _ = _probationary_layer()
    saved = deep_clone(manager.state_dict())
    apply_ok(layer, SEED_OP_FOSSILIZE, seed_id)  # frozen, optimizer not rebuilt
    manager.load_state_dict(saved)
    assert manager.group_names() == ["host"] and set(manager.named_parameters()) == _trainable(layer)
    kept = {n: s for n, s in saved["state"].items() if not n.startswith(f"kasmina_seeds.{seed_id}.")}
    assert _same(kept, manager.state_dict()["state"])
