"""UnifiedLRController: policies, out-of-band write detection, scale, resume."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from esper.tolaria.control.lr import (
    ConstantPolicy,
    CosinePolicy,
    FrozenPolicy,
    MorphoAdaptivePolicy,
    SeedWarmupPolicy,
    StepPolicy,
    UnifiedLRController,
    parse_policy,
)
from esper.tolaria.drills import tamper_lr as tamper_for_drill


def _optimizer(names: tuple[str, ...] = ("host", "s1")) -> torch.optim.Optimizer:
    groups = [{"params": [nn.Parameter(torch.zeros(2))], "name": n} for n in names]
    return torch.optim.SGD(groups, lr=0.123, momentum=0.9)


def _controller(opt: torch.optim.Optimizer) -> UnifiedLRController:
    ctl = UnifiedLRController(lambda: opt)
    ctl.register_group("host", CosinePolicy(base_lr=0.1, min_lr=0.01, warmup_steps=5, total_steps=50), start_step=0)
    ctl.register_group("s1", SeedWarmupPolicy(warmup_steps=10, host_multiplier=0.5), start_step=3)
    return ctl


def test_cosine_policy_warms_up_then_decays_to_min_lr() -> None:
    p = CosinePolicy(base_lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    assert [p.lr(s, 0, 0.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert p.lr(4, 0, 0.0) == pytest.approx(1.0)
    assert p.lr(9, 0, 0.0) == pytest.approx(0.55)
    assert p.lr(14, 0, 0.0) == pytest.approx(0.1)
    assert p.lr(1000, 0, 0.0) == pytest.approx(0.1)


def test_seed_warmup_ramps_from_registration_and_follows_host() -> None:
    p = SeedWarmupPolicy(warmup_steps=4, host_multiplier=0.5)
    assert p.lr(9, 10, 1.0) == 0.0  # before registration
    assert [p.lr(s, 10, 1.0) for s in range(10, 15)] == [0.125, 0.25, 0.375, 0.5, 0.5]
    assert SeedWarmupPolicy(warmup_steps=2, base_lr=0.3).lr(20, 0, 99.0) == pytest.approx(0.3)


def test_step_constant_frozen_policies() -> None:
    assert [StepPolicy(base_lr=1.0, gamma=0.5, step_size=2).lr(s, 0, 0) for s in range(5)] == [1, 1, 0.5, 0.5, 0.25]
    assert ConstantPolicy(lr=0.2).lr(7, 0, 0) == 0.2
    assert FrozenPolicy().lr(7, 0, 1.0) == 0.0


def test_morpho_adaptive_reduces_after_patience_and_respects_floor() -> None:
    p = MorphoAdaptivePolicy(base_lr=1.0, factor=0.5, patience=2, min_lr=0.3)
    for loss in (1.0, 0.9, 0.95, 0.95):
        p.on_validation(loss)
    assert p.lr(0, 0, 0) == 0.5
    for _ in range(4):
        p.on_validation(0.95)
    assert p.lr(0, 0, 0) == 0.3  # 0.125 floored


def test_policy_config_rejects_unknown_keys_and_kinds() -> None:
    with pytest.raises(ValidationError):
        parse_policy({"kind": "cosine", "base_lr": 0.1, "total_steps": 10, "warmpu_steps": 3})
    with pytest.raises(ValidationError):
        parse_policy({"kind": "exponential", "base_lr": 0.1})
    assert isinstance(parse_policy({"kind": "constant", "lr": 0.1}), ConstantPolicy)


def test_step_writes_every_group_and_returns_values() -> None:
    opt = _optimizer()
    ctl = _controller(opt)
    lrs = ctl.step(4)
    assert lrs == {"host": pytest.approx(0.1), "s1": pytest.approx(0.1 * 0.5 * 2 / 10)}
    assert [g["lr"] for g in opt.param_groups] == [lrs["host"], lrs["s1"]]
    assert ctl.current() == lrs


def test_direct_lr_write_is_detected_on_next_step_and_reverted() -> None:
    opt = _optimizer()
    ctl = _controller(opt)
    written = ctl.step(0)["host"]
    opt.param_groups[0]["lr"] = 0.5  # an out-of-band writer
    lrs = ctl.step(1)
    (violation,) = ctl.drain_violations()
    assert (violation.group, violation.expected, violation.found, violation.step) == ("host", written, 0.5, 1)
    assert opt.param_groups[0]["lr"] == lrs["host"]
    assert ctl.drain_violations() == []


def test_tamper_for_drill_is_caught_and_changes_within_tolerance_are_not() -> None:
    opt = _optimizer()
    ctl = _controller(opt)
    ctl.step(0)
    opt.param_groups[1]["lr"] *= 1 + 1e-9  # float noise below the relative tolerance
    ctl.step(1)
    assert ctl.drain_violations() == []
    tampered = tamper_for_drill(opt, "host", 10.0)
    ctl.step(2)
    (violation,) = ctl.drain_violations()
    assert (violation.group, violation.found) == ("host", tampered)


def test_rebuilt_optimizer_is_adopted_without_false_violation() -> None:
    holder = {"opt": _optimizer()}
    ctl = UnifiedLRController(lambda: holder["opt"])
    ctl.register_group("host", ConstantPolicy(lr=0.1))
    ctl.register_group("s1", ConstantPolicy(lr=0.2))
    ctl.step(0)
    holder["opt"] = _optimizer()  # factory default LR 0.123 everywhere
    ctl.refresh()
    assert [g["lr"] for g in holder["opt"].param_groups] == [0.1, 0.2]
    ctl.step(1)
    assert ctl.drain_violations() == []


def test_unregistered_group_in_optimizer_is_an_error_naming_the_fix() -> None:
    opt = _optimizer(("host", "s9"))
    ctl = UnifiedLRController(lambda: opt)
    ctl.register_group("host", ConstantPolicy(lr=0.1))
    with pytest.raises(KeyError, match=re.escape("register_group('s9', policy)")):
        ctl.step(0)


def test_scale_lowers_every_group_immediately_and_is_checked() -> None:
    opt = _optimizer()
    ctl = _controller(opt)
    before = ctl.step(20)
    ctl.scale(0.5, "minor: loss degradation")
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([before["host"] * 0.5, before["s1"] * 0.5])
    with pytest.raises(ValueError, match="scale factor must be > 0"):
        ctl.scale(0.0, "bad")


def test_resume_reproduces_the_lr_sequence_exactly() -> None:
    def run(ctl: UnifiedLRController, steps: range) -> list[dict[str, float]]:
        out = []
        for s in steps:
            out.append(ctl.step(s))
            if s % 7 == 6:
                ctl.report_validation(1.0)  # plateau
        return out

    def build(opt: torch.optim.Optimizer) -> UnifiedLRController:
        ctl = _controller(opt)
        ctl.register_group("m", MorphoAdaptivePolicy(base_lr=0.2, patience=2))
        return ctl

    opt = _optimizer(("host", "s1", "m"))
    ctl = build(opt)
    expected = run(ctl, range(60))
    ctl2 = build(_optimizer(("host", "s1", "m")))
    first = run(ctl2, range(30))
    ctl2.scale(0.25, "minor")
    ctl_ref = build(_optimizer(("host", "s1", "m")))
    run(ctl_ref, range(30))
    ctl_ref.scale(0.25, "minor")
    saved = ctl2.state_dict()
    resumed = UnifiedLRController(lambda: opt)
    resumed.load_state_dict(saved)
    assert first == expected[:30]
    assert run(resumed, range(30, 60)) == run(ctl_ref, range(30, 60))
    assert resumed.drain_violations() == []
    assert resumed.scale_factor == 0.25
    assert expected[59]["m"] < 0.2  # the plateau policy did reduce


def test_history_is_bounded() -> None:
    opt = _optimizer()
    ctl = UnifiedLRController(lambda: opt, history=5)
    ctl.register_group("host", ConstantPolicy(lr=0.1))
    ctl.register_group("s1", FrozenPolicy())
    for s in range(10):
        ctl.step(s)
    assert len(ctl.history) == 5
    assert ctl.history[-1] == (9, "s1", 0.0)


def test_unregister_and_duplicate_registration_errors() -> None:
    ctl = UnifiedLRController(lambda: _optimizer())
    ctl.register_group("host", ConstantPolicy(lr=0.1))
    with pytest.raises(ValueError, match="already registered"):
        ctl.register_group("host", ConstantPolicy(lr=0.1))
    with pytest.raises(KeyError, match="not registered"):
        ctl.unregister_group("nope")
    ctl.unregister_group("host")
    assert ctl.groups() == {}


def test_no_code_outside_the_controller_writes_param_group_lr() -> None:
    src = Path(__file__).resolve().parents[2] / "src"
    pattern = re.compile(r"""\[\s*["']lr["']\s*\]\s*(\*|\+|-|/)?=(?!=)""")
    offenders = []
    for path in src.rglob("*.py"):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(src)}:{lineno}")
    allowed = ("esper/tolaria/control/lr.py", "esper/tolaria/drills.py")  # the controller; the lr-tamper drill
    assert offenders and all(o.startswith(allowed) for o in offenders), offenders
