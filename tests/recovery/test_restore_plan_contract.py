"""Which models and snapshots get a fast-rollback copy plan: parameters on the root module, absent
and non-persistent buffers, and the refusals when a section or the optimizer's names are missing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from esper.tolaria.recovery.restore_plan import RestorePlan
from esper.tolaria.state.snapshot import deep_clone


class Named(torch.optim.Adam):
    """Adam whose groups carry `param_names`, as the trainer's optimizer manager builds them."""


def _named_adam(model: nn.Module) -> torch.optim.Optimizer:
    names = [n for n, _ in model.named_parameters()]
    opt = Named([{"params": list(model.parameters()), "param_names": names}], lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
    return opt


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    group = opt.param_groups[0]
    by_name = {n: opt.state[p] for n, p in zip(group["param_names"], group["params"], strict=True)}
    return deep_clone({"model": model.state_dict(), "optimizer": {"state": by_name}})  # type: ignore[no-any-return]


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4, track_running_stats=False)  # its running stats are None
        self.register_buffer("scratch", torch.zeros(4), persistent=False)  # not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x)) + self.scratch


def test_a_model_whose_parameters_sit_on_the_root_module_gets_a_plan() -> None:
    model = nn.Linear(4, 3)
    opt = _named_adam(model)
    state = _state(model, opt)  # the plan holds weak references: the snapshot must stay alive
    plan = RestorePlan.build(model, opt, state)
    assert plan is not None and len(plan) == 2 + 2 * 3  # weight and bias, and Adam's step and two moments of each
    assert plan.resolve(opt) is not None


def test_absent_and_non_persistent_buffers_are_left_out_of_the_plan() -> None:
    model = WithBuffers()
    opt = _named_adam(model)
    plan = RestorePlan.build(model, opt, _state(model, opt))
    assert plan is not None and len(plan) == len(model.state_dict()) + sum(len(s) for s in opt.state.values())


def test_no_plan_without_an_optimizer_section_or_without_parameter_names() -> None:
    model = nn.Linear(4, 3)
    opt = _named_adam(model)
    state = _state(model, opt)
    assert RestorePlan.build(model, opt, {"model": state["model"]}) is None
    assert RestorePlan.build(model, opt, {"model": state["model"], "optimizer": {"state": None}}) is None
    unnamed = torch.optim.Adam(model.parameters(), lr=0.01)
    assert RestorePlan.build(model, unnamed, state) is None
