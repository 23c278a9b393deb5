"""A rollback puts back each optimizer group's saved hyperparameters, but never the implementation
flags: a snapshot taken by a non-fused CPU optimizer must not turn a fused GPU optimizer's groups
non-fused (or the reverse), and the LR stays the LR controller's."""

from __future__ import annotations

import torch

from esper.tolaria.recovery.participants import _restore_group_hyper


def test_saved_hyperparameters_come_back_but_not_the_implementation_flags_or_the_lr() -> None:
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], lr=0.1, foreach=False, weight_decay=0.0)
    saved = {"hyper": {"weight_decay": 0.25, "foreach": True, "fused": True, "capturable": True,
                       "differentiable": True, "betas": (0.8, 0.9)}}
    _restore_group_hyper(opt, [saved])
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.25 and group["betas"] == (0.8, 0.9)
    assert group["foreach"] is False and not group["fused"] and not group["capturable"]
    assert not group["differentiable"] and group["lr"] == 0.1
