"""The host LR schedule's length and step come from the config, never from hidden constants."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from esper.tolaria.config import ConfigError, TolariaConfig, config_from_dict
from esper.tolaria.loop.wiring import host_policy_spec


def _unsized_loader() -> Iterator[int]:
    yield from range(7)


def _config(**lr: object) -> TolariaConfig:
    return config_from_dict({"run": {"epochs": 4}, "lr": lr})


def test_step_policy_decays_every_step_epochs_epochs() -> None:
    loader = list(range(25))  # 25 batches per epoch
    assert host_policy_spec(_config(host_policy="step"), loader)["step_size"] == 250  # default 10 epochs
    assert host_policy_spec(_config(host_policy="step", step_epochs=3), loader)["step_size"] == 75


def test_step_epochs_below_one_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"lr\.step_epochs: Input should be greater than or equal to 1"):
        config_from_dict({"lr": {"step_epochs": 0}})


@pytest.mark.parametrize("policy", ["cosine", "step"])
def test_a_loader_without_len_needs_lr_total_steps(policy: str) -> None:
    with pytest.raises(ConfigError, match=r"training loader has no len\(\); set lr\.total_steps"):
        host_policy_spec(_config(host_policy=policy), _unsized_loader())


def test_lr_total_steps_sets_the_schedule_length() -> None:
    spec = host_policy_spec(_config(total_steps=500), _unsized_loader())
    assert spec["total_steps"] == 500
    assert host_policy_spec(_config(total_steps=500), list(range(25)))["total_steps"] == 500  # overrides len()
    assert host_policy_spec(_config(), list(range(25)))["total_steps"] == 100  # 4 epochs x 25 batches
    step = host_policy_spec(_config(host_policy="step", step_epochs=2, total_steps=400), _unsized_loader())
    assert step["step_size"] == 200  # 2 epochs x (400 // 4) steps


def test_constant_policy_needs_no_schedule_length() -> None:
    assert host_policy_spec(_config(host_policy="constant"), _unsized_loader())["kind"] == "constant"
