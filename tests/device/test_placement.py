"""Everything a step touches lives on the run's device: batches of any structure, seeds germinated
on a moved host (its device and dtype), the NaN gradient a drill injects. The meta device stands
in for a GPU on the CPU: a tensor left behind on the host is visible, and nothing is computed."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from esper.kasmina import KasminaLayer
from esper.leyline import SEED_OP_GERMINATE, seed_command
from esper.tolaria.config import TolariaConfig
from esper.tolaria.drills import _NaNGradient
from esper.tolaria.loop import wiring
from esper.tolaria.loop.build import _train_loader, _val_loader
from esper.tolaria.tasks import move_batch

META = torch.device("meta")
Pair = namedtuple("Pair", "x y")


@dataclass
class Features:
    ids: torch.Tensor
    mask: torch.Tensor
    name: str = "batch"
    derived: list[int] = field(default_factory=list, init=False)


def tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors(v)]
    if isinstance(value, Features):
        return [value.ids, value.mask]
    return []


def test_every_tensor_of_a_nested_batch_reaches_the_device_in_its_structure() -> None:
    batch = {"pair": Pair(torch.ones(2), [torch.zeros(2, dtype=torch.long), (torch.ones(1),)]),
             "features": Features(torch.arange(3), torch.ones(3, dtype=torch.bool)), "note": "kept", "n": 3}
    moved = move_batch(batch, META)
    assert len(tensors(moved)) == 5 and all(t.device == META for t in tensors(moved))
    assert isinstance(moved["pair"], Pair) and isinstance(moved["pair"].y, list)
    assert isinstance(moved["pair"].y[1], tuple) and isinstance(moved["features"], Features)
    assert moved["features"].name == "batch" and moved["note"] == "kept" and moved["n"] == 3
    assert [t.dtype for t in tensors(moved)] == [t.dtype for t in tensors(batch)]


def test_a_packed_sequence_moves_with_its_batch_sizes_left_on_the_cpu() -> None:
    packed = pack_padded_sequence(torch.randn(3, 2, 4), torch.tensor([3, 2]))
    moved = move_batch((packed, torch.zeros(2)), META)
    assert isinstance(moved[0], PackedSequence) and moved[0].data.device == META
    assert moved[0].batch_sizes.device.type == "cpu" and moved[1].device == META


class Loader(list[Any]):
    pin_memory = False


@pytest.mark.parametrize("pinned", [False, True])
def test_batches_are_copied_without_blocking_only_from_a_pinning_loader(
        pinned: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    real = wiring.move_batch

    def spy(batch: Any, device: torch.device, *, non_blocking: bool) -> Any:
        seen.append(non_blocking)
        return real(batch, device, non_blocking=non_blocking)

    monkeypatch.setattr(wiring, "move_batch", spy)
    loader = Loader()
    loader.pin_memory = pinned
    place = wiring.batch_placer(META, loader)
    assert place is not None and place((torch.ones(2), torch.zeros(2)))[0].device == META
    assert seen == [pinned]
    assert wiring.batch_placer(torch.device("cpu"), loader) is None  # on the CPU batches already are


@pytest.mark.parametrize("device, pins", [("cpu", False), ("cuda", True)])
def test_the_loaders_tolaria_builds_for_a_dataset_pin_only_for_cuda(
        device: str, pins: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # run.device = cuda validates; nothing runs
    config = TolariaConfig.model_validate({"run": {"device": device}})
    data = torch.utils.data.TensorDataset(torch.zeros(8, 2), torch.zeros(8))
    assert _train_loader(data, config, 1, 0).pin_memory is pins
    assert _val_loader(data, config).pin_memory is pins


def host() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("blueprint", ["residual_mlp", "bottleneck_adapter", "lowrank_adapter"])
@pytest.mark.parametrize("device, dtype", [("meta", torch.float32), ("cpu", torch.float64), ("meta", torch.bfloat16)])
def test_a_seed_germinated_after_the_host_moved_is_built_on_its_device_in_its_dtype(
        blueprint: str, device: str, dtype: torch.dtype) -> None:
    model = host()
    layer = KasminaLayer(model, ["1", "3"], seed=0, example_input=torch.zeros(2, 4))  # probed on the CPU
    model.to(device=device, dtype=dtype)  # what the trainer does with run.device
    for slot in ("1", "3"):
        result = layer.apply_command(seed_command(SEED_OP_GERMINATE, issued_by="test", target_seed_id=slot,
                                                  blueprint_id=blueprint))
        assert result.ok, result.reason
        seed = model.kasmina_seeds[result.seed_id]
        for name, t in [*seed.named_parameters(), *seed.named_buffers()]:
            assert (t.device.type, t.dtype) == (device, dtype), name


def test_seeds_rebuilt_from_a_manifest_on_a_moved_host_land_on_its_device() -> None:
    source = host()
    layer = KasminaLayer(source, ["1", "3"], seed=0, example_input=torch.zeros(2, 4))
    layer.apply_command(seed_command(SEED_OP_GERMINATE, issued_by="test", target_seed_id="1"))
    resumed_model = host()
    resumed = KasminaLayer(resumed_model, ["1", "3"], seed=0, example_input=torch.zeros(2, 4))
    resumed_model.to(META)
    assert resumed.load_manifest(layer.manifest()).ok
    assert all(p.device == META for p in resumed_model.kasmina_seeds.parameters())


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float64), ("meta", torch.float32), ("cpu", torch.bfloat16)])
def test_the_nan_grad_drill_sends_its_gradient_on_the_parameters_device(device: str, dtype: torch.dtype) -> None:
    param = nn.Parameter(torch.ones(3, 2, device=device, dtype=dtype))
    loss = (param.sum() + _NaNGradient.apply(param)).float()
    loss.backward()
    grad = param.grad
    assert grad is not None and (grad.device.type, grad.dtype, grad.shape) == (device, dtype, param.shape)
    if device == "cpu":
        assert torch.isnan(grad).all() and not torch.isnan(loss)


@pytest.mark.gpu
def test_on_cuda_a_nested_pinned_batch_arrives_whole_and_the_seed_follows_the_host() -> None:
    batch = {"x": torch.randn(4, 4).pin_memory(), "y": Pair(torch.ones(4).pin_memory(), [torch.zeros(2)])}
    moved = wiring.batch_placer(torch.device("cuda"), type("L", (list,), {"pin_memory": True})())(batch)  # type: ignore[misc]
    torch.cuda.synchronize()
    assert all(t.is_cuda for t in tensors(moved)) and torch.equal(moved["x"].cpu(), batch["x"])
    model = host()
    layer = KasminaLayer(model, ["1"], seed=0, example_input=torch.zeros(2, 4))
    model.cuda()
    result = layer.apply_command(seed_command(SEED_OP_GERMINATE, issued_by="test", target_seed_id="1"))
    assert result.ok and all(p.is_cuda for p in model.kasmina_seeds.parameters())
    out = model(torch.randn(2, 4, device="cuda"))
    assert out.is_cuda


def test_an_explicit_gpu_index_under_torchrun_is_refused_with_the_fix() -> None:
    from esper.tolaria.loop.precision import resolve_device

    with pytest.raises(ValueError, match="would put all 2 ranks on GPU 1: use 'cuda' or 'auto'"):
        resolve_device("cuda:1", world_size=2)
    assert resolve_device("cpu", world_size=2) == torch.device("cpu")


@pytest.mark.parametrize("pins", [False, True])
def test_the_bundled_data_loaders_pin_when_asked(pins: bool) -> None:
    from esper.tolaria.config import DataConfig
    from esper.tolaria.data import make_loaders

    train, val, *_ = make_loaders(DataConfig(), seed=0, pin_memory=pins)
    assert train.pin_memory is pins and val.pin_memory is pins
