"""The catalog of seed architectures ("blueprints") and the shape rule that picks one.

Contract of every blueprint: `build(feature_shape, spec, generator)` returns a CPU float32
module mapping an activation of shape `(N, *feature_shape)` to the same shape. Its output
layer is zero-initialised, so a fresh seed adds exactly nothing to `h`; every other weight is
drawn from `generator` only (never the global RNG), so every process that builds seed
`seed3` of a layer with the same seed gets bit-identical weights, and germinating a seed does
not perturb the training RNG stream. Layers are declared on the meta device for that reason.

Per-sample shapes: `(F,)` flat features, `(T, C)` token sequences (a `[B, T, C]` activation),
`(C, H, W)` channels-first conv maps. `"auto"` is not a blueprint but the rule
`resolve_blueprint` applies: `(F,)` and `(T, C)` -> `residual_mlp`, `(C, H, W)` -> `conv_residual`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

AUTO = "auto"
"""The blueprint name that means: pick by the slot's activation shape."""


@dataclass(frozen=True)
class BlueprintSpec:
    """Width settings a blueprint may use (taken from KasminaConfig, recorded per seed)."""

    hidden: int
    adapter_dim: int
    rank: int = 8
    head_dim: int = 16
    causal: bool = True


Builder = Callable[[tuple[int, ...], BlueprintSpec, torch.Generator], nn.Module]


@dataclass(frozen=True)
class Blueprint:
    """A buildable seed architecture and the per-sample shapes it fits."""

    build: Builder
    fits: Callable[[tuple[int, ...]], bool]
    needs: str  # the fitting shapes in words, for error messages


class BlueprintError(ValueError):
    """A blueprint cannot be built for the activation observed at a slot."""


def _init_layer(layer: nn.Linear | nn.Conv2d, generator: torch.Generator) -> None:
    # Same distribution as PyTorch's default reset_parameters, but from our generator.
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    if layer.bias is not None:
        fan_in = layer.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def _materialize(module: nn.Module, output: nn.Linear | nn.Conv2d, generator: torch.Generator) -> nn.Module:
    """Move a meta-device `module` to CPU, draw its layers from `generator` in module order, zero `output`."""
    module.to_empty(device="cpu")
    for layer in module.modules():
        if isinstance(layer, nn.Linear | nn.Conv2d) and layer is not output:
            _init_layer(layer, generator)
    nn.init.zeros_(output.weight)
    if output.bias is not None:
        nn.init.zeros_(output.bias)
    return module


def build_residual_mlp(shape: tuple[int, ...], spec: BlueprintSpec, generator: torch.Generator) -> nn.Module:
    """Linear(F, hidden) -> GELU -> Linear(hidden, F) on the last (feature) dimension."""
    features = shape[-1]
    last = nn.Linear(spec.hidden, features, device="meta")
    body = nn.Sequential(nn.Linear(features, spec.hidden, device="meta"), nn.GELU(), last)
    return _materialize(body, last, generator)


def build_bottleneck_adapter(shape: tuple[int, ...], spec: BlueprintSpec, generator: torch.Generator) -> nn.Module:
    """Down-project Linear(F, adapter_dim) -> ReLU -> up-project Linear(adapter_dim, F)."""
    features = shape[-1]
    last = nn.Linear(spec.adapter_dim, features, device="meta")
    body = nn.Sequential(nn.Linear(features, spec.adapter_dim, device="meta"), nn.ReLU(), last)
    return _materialize(body, last, generator)


def build_conv_residual(shape: tuple[int, ...], spec: BlueprintSpec, generator: torch.Generator) -> nn.Module:
    """Conv3x3(C, hidden) -> GELU -> Conv1x1(hidden, C), for (N, C, H, W) activations."""
    channels = shape[0]
    last = nn.Conv2d(spec.hidden, channels, kernel_size=1, device="meta")
    first = nn.Conv2d(channels, spec.hidden, kernel_size=3, padding=1, device="meta")
    return _materialize(nn.Sequential(first, nn.GELU(), last), last, generator)


def build_lowrank_adapter(shape: tuple[int, ...], spec: BlueprintSpec, generator: torch.Generator) -> nn.Module:
    """LoRA-style Linear(F, rank, bias=False) -> Linear(rank, F, bias=False) on the last dimension."""
    features = shape[-1]
    up = nn.Linear(spec.rank, features, bias=False, device="meta")
    return _materialize(nn.Sequential(nn.Linear(features, spec.rank, bias=False, device="meta"), up), up, generator)


class AttentionHead(nn.Module):
    """One self-attention head over a `[N, T, C]` sequence: q, k, v C -> head_dim, output head_dim -> C.

    Causal unless built with `causal=False`: position t attends to positions <= t only.
    """

    def __init__(self, channels: int, head_dim: int, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.q = nn.Linear(channels, head_dim, device="meta")
        self.k = nn.Linear(channels, head_dim, device="meta")
        self.v = nn.Linear(channels, head_dim, device="meta")
        self.out = nn.Linear(head_dim, channels, device="meta")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.q, self.k, self.v))  # [N, 1, T, head_dim]
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(mixed.squeeze(1))

    def extra_repr(self) -> str:
        return f"causal={self.causal}"


def build_attention_head(shape: tuple[int, ...], spec: BlueprintSpec, generator: torch.Generator) -> nn.Module:
    """An extra self-attention head for (T, C) token sequences, causal by default."""
    head = AttentionHead(shape[-1], spec.head_dim, spec.causal)
    return _materialize(head, head.out, generator)


def _any_rank(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 1


LAST_DIM = "any activation with a feature dimension (applied to the last one)"
BLUEPRINTS: dict[str, Blueprint] = {
    "residual_mlp": Blueprint(build_residual_mlp, _any_rank, LAST_DIM),
    "bottleneck_adapter": Blueprint(build_bottleneck_adapter, _any_rank, LAST_DIM),
    "conv_residual": Blueprint(build_conv_residual, lambda s: len(s) == 3, "(C, H, W) conv maps"),
    "lowrank_adapter": Blueprint(build_lowrank_adapter, lambda s: len(s) in (1, 2), "(F,) features or (T, C) tokens"),
    "attention_head": Blueprint(build_attention_head, lambda s: len(s) == 2, "(T, C) token sequences"),
}

_AUTO_RULES = {1: "residual_mlp", 2: "residual_mlp", 3: "conv_residual"}  # per-sample rank -> blueprint


def fitting_blueprints(shape: tuple[int, ...]) -> list[str]:
    """Names of the blueprints that can be built for per-sample `shape`, sorted."""
    return sorted(name for name, blueprint in BLUEPRINTS.items() if blueprint.fits(shape))


def _fit_hint(shape: tuple[int, ...]) -> str:
    fitting = fitting_blueprints(shape)
    if not fitting:
        return f"no blueprint fits per-sample shape {shape}: a slot must output at least [batch, features]"
    return f"blueprints that fit {shape}: {', '.join(fitting)}"


def resolve_blueprint(name: str, shape: tuple[int, ...]) -> str:
    """The blueprint `name` means for per-sample `shape` ("auto" picks by shape); BlueprintError if none fits."""
    if name == AUTO:
        picked = _AUTO_RULES.get(len(shape))
        if picked is None:
            raise BlueprintError(
                f"blueprint 'auto' has no rule for per-sample shape {shape} (it knows (F,), (T, C) and (C, H, W)); "
                f"name a blueprint instead; {_fit_hint(shape)}"
            )
        return picked
    blueprint = BLUEPRINTS.get(name)
    if blueprint is None:
        raise BlueprintError(f"unknown blueprint {name!r}; known blueprints: {sorted(BLUEPRINTS)} or 'auto'")
    if not blueprint.fits(shape):
        raise BlueprintError(
            f"blueprint {name} does not fit per-sample shape {shape}: it needs {blueprint.needs}; {_fit_hint(shape)}"
        )
    return name


def build_blueprint(name: str, shape: tuple[int, ...], spec: BlueprintSpec, generator: torch.Generator) -> nn.Module:
    """Build blueprint `name` (or the one "auto" picks); BlueprintError names the problem and what fits."""
    return BLUEPRINTS[resolve_blueprint(name, shape)].build(shape, spec, generator)
