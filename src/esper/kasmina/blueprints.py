"""The catalog of seed architectures ("blueprints").

Contract of every blueprint: `build(feature_shape, spec, generator)` returns a CPU float32
module mapping an activation of shape `(N, *feature_shape)` to the same shape. Its output
layer is zero-initialised, so a fresh seed adds exactly nothing to `h`; every other weight is
drawn from `generator` only (never the global RNG), so every process that builds seed
`seed3` of a layer with the same seed gets bit-identical weights, and germinating a seed does
not perturb the training RNG stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BlueprintSpec:
    """Width settings a blueprint may use (taken from KasminaConfig)."""

    hidden: int
    adapter_dim: int


Builder = Callable[[tuple[int, ...], BlueprintSpec, torch.Generator], nn.Module]


class BlueprintError(ValueError):
    """A blueprint cannot be built for the activation observed at a slot."""


def _init_linear(layer: nn.Linear | nn.Conv2d, generator: torch.Generator) -> None:
    # Same distribution as PyTorch's default reset_parameters, but from our generator.
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    if layer.bias is not None:
        fan_in = layer.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def _zero(layer: nn.Linear | nn.Conv2d) -> None:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _two_layer(
    first: nn.Linear | nn.Conv2d, act: nn.Module, last: nn.Linear | nn.Conv2d, generator: torch.Generator
) -> nn.Module:
    """Materialize meta-device layers on CPU, init `first` from `generator`, zero `last`.

    Layers are declared on the meta device so their constructors consume no global RNG.
    """
    first.to_empty(device="cpu")
    last.to_empty(device="cpu")
    _init_linear(first, generator)
    _zero(last)
    return nn.Sequential(first, act, last)


def _features(shape: tuple[int, ...], blueprint: str) -> int:
    if len(shape) < 1:
        raise BlueprintError(f"{blueprint} needs an activation with a feature dimension, got per-sample shape {shape}")
    return shape[-1]


def build_residual_mlp(shape: tuple[int, ...], spec: BlueprintSpec, generator: torch.Generator) -> nn.Module:
    """Linear(F, hidden) -> GELU -> Linear(hidden, F) on the last (feature) dimension."""
    features = _features(shape, "residual_mlp")
    return _two_layer(
        nn.Linear(features, spec.hidden, device="meta"), nn.GELU(), nn.Linear(spec.hidden, features, device="meta"),
        generator,
    )


def build_bottleneck_adapter(shape: tuple[int, ...], spec: BlueprintSpec, generator: torch.Generator) -> nn.Module:
    """Down-project Linear(F, adapter_dim) -> ReLU -> up-project Linear(adapter_dim, F)."""
    features = _features(shape, "bottleneck_adapter")
    return _two_layer(
        nn.Linear(features, spec.adapter_dim, device="meta"),
        nn.ReLU(),
        nn.Linear(spec.adapter_dim, features, device="meta"),
        generator,
    )


def build_conv_residual(shape: tuple[int, ...], spec: BlueprintSpec, generator: torch.Generator) -> nn.Module:
    """Conv3x3(C, hidden) -> GELU -> Conv1x1(hidden, C), for (N, C, H, W) activations."""
    if len(shape) != 3:
        raise BlueprintError(f"conv_residual needs 4-D activations (N, C, H, W), got per-sample shape {shape}")
    channels = shape[0]
    return _two_layer(
        nn.Conv2d(channels, spec.hidden, kernel_size=3, padding=1, device="meta"),
        nn.GELU(),
        nn.Conv2d(spec.hidden, channels, kernel_size=1, device="meta"),
        generator,
    )


BLUEPRINTS: dict[str, Builder] = {
    "residual_mlp": build_residual_mlp,
    "bottleneck_adapter": build_bottleneck_adapter,
    "conv_residual": build_conv_residual,
}


def build_blueprint(
    name: str, shape: tuple[int, ...], spec: BlueprintSpec, generator: torch.Generator
) -> nn.Module:
    """Build blueprint `name`; raises BlueprintError naming the problem (unknown name, wrong shape)."""
    builder = BLUEPRINTS.get(name)
    if builder is None:
        raise BlueprintError(f"unknown blueprint {name!r}; known blueprints: {sorted(BLUEPRINTS)}")
    return builder(shape, spec, generator)
