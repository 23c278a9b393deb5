"""The fast rollback's precomputed copy plan: when it may be used, when it must refuse, and that a
rollback through it is exact."""

from __future__ import annotations

import gc
import random
from typing import Any

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from esper.tolaria.recovery.restore_plan import RestorePlan
from esper.tolaria.recovery.snapshot_cache import SnapshotCache, samples_equal
from esper.tolaria.recovery.tensor_restore import _sample_view
from esper.tolaria.state.rng import _NumpyStateProbe, rng_state, set_rng_state
from esper.tolaria.state.snapshot import deep_clone, state_checksum


class Named(torch.optim.Adam):
    """Adam whose groups carry `param_names`, as the trainer's optimizer manager builds them."""


def _setup(momentum_buffers: bool = True) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    names = [n for n, _ in model.named_parameters()]
    opt = Named([{"params": list(model.parameters()), "param_names": names, "name": "host"}], lr=0.01)
    if momentum_buffers:
        _train(model, opt)
    return model, opt


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 6)).square().mean().backward()
        opt.step()


def _snapshot_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    group = opt.param_groups[0]
    by_name = {n: opt.state[p] for n, p in zip(group["param_names"], group["params"], strict=True) if p in opt.state}
    return deep_clone({"model": model.state_dict(), "optimizer": {"state": by_name}})  # type: ignore[no-any-return]


def _live(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return _snapshot_state(model, opt)


def test_a_resolved_plan_restores_weights_buffers_and_optimizer_state_exactly() -> None:
    model, opt = _setup()
    state = _snapshot_state(model, opt)
    plan = RestorePlan.build(model, opt, state)
    assert plan is not None and len(plan) == 6 + 3 + 6 * 3  # params, BN buffers, Adam's three per param
    _train(model, opt, 3)
    assert state_checksum(_live(model, opt)) != state_checksum(state)
    pairs = plan.resolve(opt)
    assert pairs is not None
    with torch.no_grad():
        torch._foreach_copy_(*pairs)
    assert state_checksum(_live(model, opt)) == state_checksum(state)


def test_the_plan_refuses_once_the_optimizer_was_rebuilt_or_grew_state() -> None:
    model, opt = _setup(momentum_buffers=False)
    state = _snapshot_state(model, opt)
    plan = RestorePlan.build(model, opt, state)
    assert plan is not None and plan.resolve(opt) is not None
    _train(model, opt, 1)  # Adam creates its state lazily: tensors the plan cannot restore
    assert plan.resolve(opt) is None
    state = _snapshot_state(model, opt)
    plan = RestorePlan.build(model, opt, state)
    assert plan is not None and plan.resolve(opt) is not None
    rebuilt = Named(opt.param_groups, lr=0.01)
    assert plan.resolve(rebuilt) is None


def test_the_plan_refuses_a_freed_or_reshaped_tensor_and_holds_nothing_alive() -> None:
    model, opt = _setup()
    state = _snapshot_state(model, opt)
    plan = RestorePlan.build(model, opt, state)
    assert plan is not None and plan.resolve(opt) is not None
    weight = model[0].weight
    with torch.no_grad():
        weight.data = torch.zeros(4, 6)  # same object, new shape
    assert plan.resolve(opt) is None

    model, opt = _setup()
    state = _snapshot_state(model, opt)
    plan = RestorePlan.build(model, opt, state)
    assert plan is not None
    del state  # the snapshot went away: its tensors must not be kept by the plan
    gc.collect()
    assert plan.resolve(opt) is None


def test_no_plan_for_a_model_whose_state_dict_the_walk_does_not_match() -> None:
    model, opt = _setup()
    state = _snapshot_state(model, opt)
    state["model"]["extra"] = torch.zeros(1)  # e.g. written by a state-dict hook
    assert RestorePlan.build(model, opt, state) is None
    state = _snapshot_state(model, opt)
    state["model"]["0.weight"] = torch.zeros(2, 2)
    assert RestorePlan.build(model, opt, state) is None


def test_a_snapshot_with_a_plan_can_still_be_recycled() -> None:
    model, opt = _setup()
    cache = SnapshotCache(capacity=1, recycle=True)
    first = cache.take("a", 0, 0, {"model": model.state_dict()})
    assert first is not None
    first.restore_plan = RestorePlan.build(model, opt, {"model": first.state["model"],
                                                        "optimizer": _snapshot_state(model, opt)["optimizer"]})
    assert first.restore_plan is not None
    del first
    cache.take("b", 1, 1, {"model": model.state_dict()})
    cache.take("c", 2, 2, {"model": model.state_dict()})
    assert cache.recycled_total == 1


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64,
                                                       torch.uint8, torch.bfloat16]), flip=st.integers(0, 10**6))
def test_host_sampling_agrees_with_the_torch_sampling(n: int, dtype: torch.dtype, flip: int) -> None:
    a = (torch.randn(n) * 100).to(dtype)
    b = a.clone()
    assert samples_equal(a, b)
    index = flip % n
    b.view(-1).view(torch.uint8)[index * b.element_size()] ^= 1
    torch_says = torch.equal(_sample_view(a), _sample_view(b))
    assert samples_equal(a, b) == torch_says


def test_nan_samples_compare_equal_by_their_bits() -> None:
    a = torch.full((10,), float("nan"))
    assert samples_equal(a, a.clone())


def test_rng_restore_skips_numpy_only_when_nothing_was_drawn() -> None:
    probe = _NumpyStateProbe()
    saved = rng_state()
    assert probe.holds(saved["numpy"])
    expected = (torch.rand(3), np.random.rand(3), random.random())
    assert not probe.holds(saved["numpy"])
    np.random.standard_normal()  # leaves a cached Gaussian: must be restored too
    set_rng_state(saved)
    assert probe.holds(saved["numpy"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]
    set_rng_state(saved)
    g1 = np.random.standard_normal(3)
    set_rng_state(saved)
    assert np.array_equal(g1, np.random.standard_normal(3))
