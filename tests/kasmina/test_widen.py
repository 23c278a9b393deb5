"""Net2Net-style widening of a host layer: more units, the same function, through rollback and resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper.kasmina import KasminaConfig, KasminaLayer
from esper.kasmina.widen import WIDEN
from esper.leyline import SEED_OP_GERMINATE, seed_command
from esper.tolaria.zoo import digits_cnn

from .helpers import apply_ok, make_host


def _mlp_layer(model: nn.Module | None = None) -> KasminaLayer:
    config = KasminaConfig(widen=[["2", "4"]], widen_units=3, seed_hidden=8)
    return KasminaLayer(model or make_host(), ["1", "3"], config=config, example_input=torch.zeros(2, 4))


def _widen(layer: KasminaLayer, target: str) -> object:
    return layer.apply_command(seed_command(SEED_OP_GERMINATE, issued_by="t", target_seed_id=target,
                                            blueprint_id=WIDEN))


def test_widening_a_linear_pair_keeps_the_function_and_adds_what_it_announced() -> None:
    torch.manual_seed(0)
    layer = _mlp_layer()
    x = torch.randn(32, 4)
    before, params = layer.model(x), layer.param_count()
    announced = layer.germination_params("2", WIDEN)
    result = _widen(layer, "2")
    assert result.ok and result.reshaped_params == ("2.weight", "2.bias", "4.weight")  # type: ignore[attr-defined]
    assert layer.model[2].weight.shape == (11, 8) and layer.model[4].weight.shape == (3, 11)  # type: ignore[index]
    assert layer.param_count() - params == announced == 3 * (8 + 1 + 3)
    assert torch.allclose(layer.model(x), before, atol=1e-6)
    assert layer.export_seed_states()[1].metrics["slot_index"] == 1  # slot "3" (after layer 2) is free
    assert apply_ok(layer, SEED_OP_GERMINATE, "3")  # a seed born at the new width
    assert layer.model(x).shape == (32, 3)


def test_widening_a_conv_block_with_its_batchnorm_keeps_the_function() -> None:
    torch.manual_seed(0)
    model = digits_cnn(channels=[2, 4], hidden=8, dropout=0.0)
    layer = KasminaLayer(model, ["conv1.2", "conv2.2", "fc.1"], example_input=torch.zeros(2, 1, 8, 8),
                         config=KasminaConfig(widen=[["conv1.0", "conv1.1", "conv2.0"]], widen_units=2))
    model.train()
    for _ in range(3):  # running statistics that are not the defaults
        model(torch.randn(16, 1, 8, 8))
    model.eval()
    x = torch.randn(8, 1, 8, 8)
    before = model(x)
    assert _widen(layer, "conv1.0").ok  # type: ignore[attr-defined]
    assert model.conv1[0].out_channels == 4 and model.conv1[1].running_mean.shape == (4,)
    assert torch.allclose(model(x), before, atol=1e-5)
    state = next(s for s in layer.export_seed_states() if s.seed_id == "conv1.2")
    assert layer.germination_params("conv1.2") == state.metrics["germination_params"]
    assert layer.manifest()["shapes"]["conv1.2"] == [4, 8, 8]


def test_a_seed_on_a_slot_the_widening_would_change_blocks_it() -> None:
    layer = _mlp_layer()
    apply_ok(layer, SEED_OP_GERMINATE, "3")
    result = _widen(layer, "2")
    assert not result.ok and "sit on slots ['3']" in result.reason  # type: ignore[attr-defined]
    assert layer.model[2].weight.shape == (8, 8)  # type: ignore[index]
    assert not _widen(layer, "1").ok  # type: ignore[attr-defined]  # not a listed pair


def test_a_manifest_rebuilds_the_widening_on_a_fresh_host_and_a_rollback_narrows_it_back() -> None:
    torch.manual_seed(0)
    layer = _mlp_layer()
    narrow_manifest = layer.manifest()
    narrow_state = {k: v.clone() for k, v in layer.model.state_dict().items()}
    _widen(layer, "2")
    wide_manifest, wide_state = layer.manifest(), layer.model.state_dict()
    x = torch.randn(5, 4)
    wide_out = layer.model(x)

    fresh = _mlp_layer()  # a resume: a fresh host, then the manifest, then the weights
    loaded = fresh.load_manifest(wide_manifest)
    assert loaded.ok and set(loaded.reshaped_params) >= {"2.weight", "2.bias", "4.weight"}
    fresh.model.load_state_dict(wide_state)
    assert torch.equal(fresh.model(x), wide_out)

    back = layer.load_manifest(narrow_manifest)  # a rollback to before the widening
    assert back.ok and layer.model[2].weight.shape == (8, 8)  # type: ignore[index]
    layer.model.load_state_dict(narrow_state)
    assert layer.manifest() == narrow_manifest


def test_a_pair_that_cannot_be_widened_is_refused_when_kasmina_is_built() -> None:
    with pytest.raises(ValueError, match=r"kasmina.widen consumer '3' is ReLU"):
        KasminaLayer(make_host(), ["1"], config=KasminaConfig(widen=[["2", "3"]]))
    with pytest.raises(ValueError, match="'2' has 8 units but '0' takes 4 inputs"):
        KasminaLayer(make_host(), ["1"], config=KasminaConfig(widen=[["2", "0"]]))
