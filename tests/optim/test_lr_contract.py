"""The LR controller's exact contract: plateau and step-decay boundaries, what unregistering
forgets, what a loaded state restores (and which policy objects it keeps), and how a caught
out-of-band write reaches the breaker and the events."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from esper.leyline import TELEMETRY_LEVEL_ERROR
from esper.tolaria.control.breakers import CircuitBreaker
from esper.tolaria.control.lr import (
    ConstantPolicy,
    CosinePolicy,
    FrozenPolicy,
    MorphoAdaptivePolicy,
    SeedWarmupPolicy,
    StepPolicy,
    UnifiedLRController,
    record_lr_violations,
)


def _optimizer(names: tuple[str, ...] = ("host", "s1")) -> torch.optim.Optimizer:
    groups = [{"params": [nn.Parameter(torch.zeros(2))], "name": n} for n in names]
    return torch.optim.SGD(groups, lr=0.123)


def _controller(opt: torch.optim.Optimizer) -> UnifiedLRController:
    ctl = UnifiedLRController(lambda: opt)
    ctl.register_group("host", ConstantPolicy(lr_value=0.1), start_step=0)
    ctl.register_group("s1", ConstantPolicy(lr_value=0.05), start_step=0)
    return ctl


# policies at their boundaries

def test_a_plateau_policy_never_reduces_while_the_loss_keeps_improving() -> None:
    policy = MorphoAdaptivePolicy(base_lr=1.0, patience=1, threshold=0.0)
    for loss in (1.0, 0.5, 0.25, 0.125):
        policy.on_validation(loss)
    assert policy.lr(0, 0, 0.0) == 1.0


def test_a_loss_equal_to_the_best_is_no_improvement() -> None:
    policy = MorphoAdaptivePolicy(base_lr=1.0, factor=0.5, patience=1, threshold=0.0)
    policy.on_validation(1.0)
    policy.on_validation(1.0)
    assert policy.lr(0, 0, 0.0) == 0.5


def test_step_decay_counts_steps_from_the_groups_registration() -> None:
    every_step = StepPolicy(base_lr=1.0, gamma=0.5, step_size=1)
    assert every_step.lr(7, 7, 0.0) == 1.0  # the registration step itself: no decay yet
    assert every_step.lr(9, 7, 0.0) == 0.25
    decade = StepPolicy(base_lr=1.0, gamma=0.1, step_size=10)
    assert decade.lr(15, 10, 0.0) == 1.0  # 5 steps after registration, not 25


# unregistering

def test_an_unregistered_group_leaves_the_current_lrs() -> None:
    opt = _optimizer()
    ctl = _controller(opt)
    ctl.step(0)
    ctl.unregister_group("s1")
    assert ctl.current() == {"host": 0.1}


def test_a_new_seed_under_a_removed_seeds_name_is_adopted_not_flagged() -> None:
    opt = _optimizer()
    ctl = _controller(opt)
    ctl.step(0)
    ctl.unregister_group("s1")
    del opt.param_groups[1]  # the seed's group leaves the optimizer...
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "name": "s1"})  # ...a new one arrives, lr 0.123
    ctl.register_group("s1", ConstantPolicy(lr_value=0.02))
    assert ctl.step(1) == {"host": 0.1, "s1": 0.02}
    assert ctl.drain_violations() == []


# loading a state

def test_loading_the_same_definitions_keeps_the_policy_objects_and_loads_their_counters() -> None:
    opt = _optimizer(("host", "m"))
    ctl = UnifiedLRController(lambda: opt)
    ctl.register_group("host", ConstantPolicy(lr_value=0.1), start_step=0)
    ctl.register_group("m", MorphoAdaptivePolicy(base_lr=0.2, patience=1), start_step=0)
    ctl.step(0)
    saved = ctl.state_dict()
    before = ctl.groups()
    ctl.report_validation(1.0)
    ctl.report_validation(1.0)  # one reduction after the save
    ctl.load_state_dict(saved)
    after = ctl.groups()
    assert after["host"] is before["host"] and after["m"] is before["m"]
    assert saved["groups"]["host"]["policy"] == {"kind": "constant", "lr": 0.1}  # the config's spelling
    assert ctl.step(1)["m"] == 0.2  # the reduction made after the save is gone


def test_loading_a_changed_definition_replaces_the_policy() -> None:
    opt = _optimizer()
    other = _controller(_optimizer())
    other.unregister_group("host")
    other.register_group("host", ConstantPolicy(lr_value=0.3), start_step=0)
    ctl = _controller(opt)
    ctl.load_state_dict(other.state_dict())
    assert ctl.step(0)["host"] == 0.3


def test_a_loaded_state_keeps_the_last_32_scale_reasons() -> None:
    opt = _optimizer()
    ctl = _controller(opt)
    ctl.step(0)
    for i in range(3):
        ctl.scale(0.5, f"minor {i}")
    resumed = UnifiedLRController(lambda: opt)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.state_dict()["scale_reasons"] == [(0.5, "minor 0"), (0.5, "minor 1"), (0.5, "minor 2")]
    for i in range(40):
        resumed.scale(1.0, f"again {i}")
    reasons = resumed.state_dict()["scale_reasons"]
    assert len(reasons) == 32 and reasons[-1] == (1.0, "again 39")


def test_a_group_registered_after_a_resume_starts_at_the_step_after_the_saved_one() -> None:
    opt = _optimizer()
    ctl = _controller(opt)
    for s in range(30):
        ctl.step(s)
    resumed = UnifiedLRController(lambda: opt)
    resumed.load_state_dict(ctl.state_dict())
    resumed.unregister_group("s1")
    resumed.register_group("s1", SeedWarmupPolicy(warmup_steps=10, base_lr=1.0))
    assert resumed.step(30)["s1"] == 0.1  # the first of ten warm-up steps


def test_a_state_saved_before_any_step_loads_as_not_started() -> None:
    fresh = _controller(_optimizer())
    resumed = UnifiedLRController(lambda: _optimizer())
    resumed.load_state_dict(fresh.state_dict())
    resumed.refresh()  # nothing to recompute before the first step
    assert resumed.current() == {} and resumed.state_dict()["last_step"] is None


# a caught write: a breaker failure and an event

def test_each_caught_write_is_a_breaker_failure_and_an_error_event() -> None:
    opt = _optimizer()
    ctl = _controller(opt)
    ctl.step(0)
    opt.param_groups[0]["lr"] = 0.5
    ctl.step(1)
    breaker = CircuitBreaker("lr", failure_threshold=1)
    events: list[tuple[str, int, dict[str, Any]]] = []

    def sink(description: str, level: int = 0, priority: int = 0, **attributes: object) -> None:
        events.append((description, level, dict(attributes)))

    record_lr_violations(ctl, breaker, sink)
    assert breaker.total_failures == 1 and not breaker.is_closed
    assert breaker.last_reason == "group host: lr 0.5 written out of band (expected 0.1)"
    assert events == [("lr_out_of_band_write", TELEMETRY_LEVEL_ERROR,
                       {"group": "host", "expected": 0.1, "found": 0.5, "step": 1, "breaker_opened": True})]
    record_lr_violations(ctl, breaker, sink)  # drained: nothing twice
    assert breaker.total_failures == 1 and len(events) == 1


# more boundaries: cosine from a later registration, plateau counters, refusals, defaults

def test_a_cosine_registered_later_counts_from_its_registration() -> None:
    policy = CosinePolicy(base_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=10)
    assert policy.lr(10, 10, 0.0) == 1.0  # its first step: the peak, not 20 steps in
    one_step = CosinePolicy(base_lr=1.0, min_lr=0.25, warmup_steps=0, total_steps=1)
    assert one_step.lr(1, 0, 0.0) == 0.25  # a one-step cosine is at its floor after that step


def test_an_improvement_and_a_reduction_each_restart_the_patience_count() -> None:
    policy = MorphoAdaptivePolicy(base_lr=1.0, factor=0.5, patience=2, threshold=0.0)
    for loss in (1.0, 0.5, 0.6):  # an improvement, then one bad report: not yet a plateau
        policy.on_validation(loss)
    assert policy.lr(0, 0, 0.0) == 1.0
    policy.on_validation(0.6)  # the second bad report: one reduction
    policy.on_validation(0.6)  # one bad report after the reduction: not another
    assert policy.lr(0, 0, 0.0) == 0.5


def test_bad_arguments_are_refused_naming_the_value() -> None:
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        UnifiedLRController(lambda: _optimizer(), tolerance=0.0)
    ctl = UnifiedLRController(lambda: _optimizer())
    with pytest.raises(ValueError, match="start_step must be >= 0 or None"):
        ctl.register_group("host", ConstantPolicy(lr_value=0.1), start_step=-1)
    unnamed = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    bare = UnifiedLRController(lambda: unnamed)
    with pytest.raises(ValueError, match="has no 'name'"):
        bare.step(0)


def test_a_policy_given_as_a_config_mapping_is_parsed() -> None:
    opt = _optimizer(("host",))
    ctl = UnifiedLRController(lambda: opt)
    ctl.register_group("host", {"kind": "constant", "lr": 0.07})
    assert ctl.step(0) == {"host": 0.07}


def test_without_a_host_group_a_seed_following_the_host_gets_zero() -> None:
    opt = _optimizer(("s1", "s2"))
    ctl = UnifiedLRController(lambda: opt)
    ctl.register_group("s1", SeedWarmupPolicy(warmup_steps=1), start_step=0)
    ctl.register_group("s2", SeedWarmupPolicy(warmup_steps=1, base_lr=0.2), start_step=0)
    assert ctl.step(0) == {"s1": 0.0, "s2": 0.2}


def test_a_fresh_controller_keeps_the_last_32_scale_reasons() -> None:
    ctl = UnifiedLRController(lambda: _optimizer())
    for i in range(40):
        ctl.scale(1.0, f"minor {i}")
    reasons = ctl.state_dict()["scale_reasons"]
    assert len(reasons) == 32 and reasons[0] == (1.0, "minor 8")


def test_drift_within_the_relative_tolerance_or_float_noise_on_a_frozen_group_is_no_violation() -> None:
    opt = _optimizer()
    ctl = UnifiedLRController(lambda: opt)  # tolerance 1e-6
    ctl.register_group("host", ConstantPolicy(lr_value=0.1), start_step=0)
    ctl.register_group("s1", FrozenPolicy(), start_step=0)
    ctl.step(0)
    opt.param_groups[0]["lr"] = 0.1 * (1 + 1e-7)
    opt.param_groups[1]["lr"] = 1e-16
    ctl.step(1)
    assert ctl.drain_violations() == []


def test_a_host_warm_up_that_would_follow_itself_is_refused_and_one_with_a_target_warms_up() -> None:
    opt = _optimizer(("host",))
    ctl = UnifiedLRController(lambda: opt)
    with pytest.raises(ValueError, match="give it a base_lr"):
        ctl.register_group("host", SeedWarmupPolicy(warmup_steps=4))
    with pytest.raises(ValueError, match="give it a base_lr"):
        ctl.register_group("host", {"kind": "seed_warmup", "warmup_steps": 4})
    assert ctl.groups() == {}  # nothing half-registered
    ctl.register_group("host", SeedWarmupPolicy(warmup_steps=4, base_lr=0.8), start_step=0)
    assert [ctl.step(s)["host"] for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])


def test_an_out_of_band_write_after_a_group_not_yet_written_is_still_caught() -> None:
    opt = _optimizer(("host",))
    ctl = UnifiedLRController(lambda: opt)
    ctl.register_group("host", ConstantPolicy(lr_value=0.1), start_step=0)
    ctl.step(0)
    # A seed's group joins the same optimizer ahead of the host's (not written yet), then the
    # host's LR is changed behind the controller's back.
    opt.param_groups.insert(0, {**opt.param_groups[0], "params": [nn.Parameter(torch.zeros(2))], "name": "s1"})
    ctl.register_group("s1", ConstantPolicy(lr_value=0.05))
    opt.param_groups[1]["lr"] = 0.7
    ctl.step(1)
    assert [(v.group, v.found) for v in ctl.drain_violations()] == [("host", 0.7)]


def test_a_registered_policy_object_is_the_one_the_controller_drives() -> None:
    opt = _optimizer(("host",))
    ctl = UnifiedLRController(lambda: opt)
    policy = MorphoAdaptivePolicy(base_lr=1.0, factor=0.5, patience=1, threshold=0.0)
    ctl.register_group("host", policy, start_step=0)
    for loss in (1.0, 1.0):
        ctl.report_validation(loss)
    assert policy.lr(0, 0, 0.0) == 0.5  # the caller's object saw the plateau
    assert ctl.step(0)["host"] == 0.5
