"""Optimizer state loaded from a snapshot or checkpoint lands where its optimizer reads it: per-element
state on the parameter's device in its dtype, `step` on the device as float32 for fused and
capturable Adam, a CPU scalar otherwise. Meta parameters stand in for a GPU on the CPU (nothing
can be read back from them, so a value that stayed on the host is visible)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from esper.tolaria.control.lr import ConstantPolicy, UnifiedLRController
from esper.tolaria.control.optimizer import DynamicOptimizerManager

Factory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


def adam(**options: Any) -> Factory:
    return lambda groups: torch.optim.Adam(groups, lr=0.01, **options)


def manager(model: nn.Module, factory: Factory) -> DynamicOptimizerManager:
    holder: list[DynamicOptimizerManager] = []
    holder.append(DynamicOptimizerManager(model, factory, UnifiedLRController(lambda: holder[0].optimizer),
                                          host_policy=ConstantPolicy(lr=0.01), seed_policy_factory=lambda _s: {}))
    return holder[0]


def model_on(device: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(device=device, dtype=dtype)


def train(model: nn.Module, optim: DynamicOptimizerManager, steps: range) -> None:
    device = next(model.parameters()).device
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 4, generator=gen).to(device), torch.randn(8, 2, generator=gen).to(device)
        optim.optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x).float(), y).backward()
        optim.optimizer.step()


def host_state(saved: dict[str, Any], step_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A snapshot's view of `saved`: every tensor a host (CPU) copy, `step` in `step_dtype`."""
    out = copy.deepcopy(saved)
    for entry in out["state"].values():
        for key, value in entry.items():
            entry[key] = value.cpu().to(step_dtype) if key == "step" else value.cpu()
    return out


@pytest.mark.parametrize("options", [{"capturable": True}, {"fused": True}], ids=["capturable", "fused"])
def test_a_device_reading_adam_gets_its_step_on_the_device_as_float32(options: dict[str, Any]) -> None:
    cpu = manager(model_on("cpu"), adam())
    train(cpu.model, cpu, range(2))
    target = manager(model_on("meta", torch.bfloat16), adam(**options))
    target.load_state_dict(host_state(cpu.state_dict(), step_dtype=torch.float64))
    for entry in target.state_dict()["state"].values():
        assert (entry["step"].device.type, entry["step"].dtype) == ("meta", torch.float32)
        for key in ("exp_avg", "exp_avg_sq"):
            assert (entry[key].device.type, entry[key].dtype) == ("meta", torch.bfloat16), key


def test_a_plain_adam_keeps_its_step_a_cpu_scalar_and_moves_the_moments() -> None:
    cpu = manager(model_on("cpu"), adam(foreach=True))
    train(cpu.model, cpu, range(2))
    target = manager(model_on("meta"), adam(foreach=True))
    target.load_state_dict(host_state(cpu.state_dict()))
    for entry in target.state_dict()["state"].values():
        assert (entry["step"].device.type, entry["step"].dtype, float(entry["step"])) == ("cpu", torch.float32, 2.0)
        assert entry["exp_avg"].device.type == "meta" and entry["exp_avg_sq"].device.type == "meta"


@pytest.mark.parametrize("options", [{}, {"foreach": True}, {"fused": True}], ids=["single", "foreach", "fused"])
def test_adam_resumed_from_host_copies_continues_bit_exactly_on_cpu(options: dict[str, Any]) -> None:
    run = manager(model_on("cpu"), adam(**options))
    train(run.model, run, range(3))
    saved = host_state(run.state_dict())
    twin = manager(copy.deepcopy(run.model), adam(**options))
    twin.load_state_dict(saved)
    train(run.model, run, range(3, 6))
    train(twin.model, twin, range(3, 6))
    for (name, p), q in zip(run.model.named_parameters(), twin.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert all(s["step"].data_ptr() != r["step"].data_ptr()  # new tensors: the snapshot is never aliased
               for s, r in zip(twin.state_dict()["state"].values(), saved["state"].values(), strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("saved_with, loaded_with", [
    ({}, {"capturable": True}), ({}, {"fused": True}), ({"fused": True}, {}), ({"capturable": True}, {"foreach": True}),
], ids=["plain->capturable", "plain->fused", "fused->plain", "capturable->foreach"])
def test_cuda_adam_restored_from_host_copies_steps_like_the_uninterrupted_one(
        saved_with: dict[str, Any], loaded_with: dict[str, Any]) -> None:
    run = manager(model_on("cuda"), adam(**saved_with))
    train(run.model, run, range(3))
    saved = host_state(run.state_dict())
    twin = manager(copy.deepcopy(run.model), adam(**loaded_with))
    twin.load_state_dict(saved)
    device_step = bool(loaded_with.get("fused") or loaded_with.get("capturable"))
    for entry in twin.state_dict()["state"].values():
        assert entry["step"].device.type == ("cuda" if device_step else "cpu")
        assert entry["step"].dtype == torch.float32 and entry["exp_avg"].device.type == "cuda"
    reference = manager(copy.deepcopy(twin.model), adam(**loaded_with))
    reference.load_state_dict(run.state_dict())  # straight from the live tensors, no host round trip
    train(twin.model, twin, range(3, 6))
    train(reference.model, reference, range(3, 6))
    for p, q in zip(twin.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(p, q)
