"""Widening a host layer in place, Net2Net style: more units, the same function.

A widenable pair is a producer (`nn.Linear` or `nn.Conv2d`) whose output units feed, through
unit-wise modules only (an optional BatchNorm, activations, pooling, dropout), a consumer of the
same kind. Widening by k appends k units to the producer (and the norm), each a copy of a unit
drawn from the generator, and splits the consumer's weights of a copied unit between it and
its copies at a random ratio (in [0.25, 0.75]). Copies compute exactly what their source does,
and the consumer sees their sum, so the model's function is unchanged (up to float rounding);
the unequal split gives the copies different gradients, so they drift apart and learn.

New units are appended, so every parameter keeps its leading region: the optimizer's reshape
rule (`resize_state_tensor`: keep the overlap, zeros elsewhere) carries its state.
`narrow` cuts a widened pair back to its first units (a rollback or a manifest from before the
widening; the weights are loaded afterwards).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

WIDEN = "net2wider"
"""The blueprint id of a GERMINATE that widens a layer instead of growing a seed."""

_Layer = nn.Linear | nn.Conv2d
_Norm = nn.BatchNorm1d | nn.BatchNorm2d


@dataclass(frozen=True)
class WidenPair:
    """A producer, its optional norm and its consumer, by module name."""

    layer: str
    consumer: str
    norm: str = ""


def parse_pairs(entries: list[list[str]]) -> list[WidenPair]:
    """`kasmina.widen` entries, [layer, consumer] or [layer, norm, consumer], as pairs."""
    pairs = []
    for entry in entries:
        if len(entry) == 2:
            pairs.append(WidenPair(entry[0], entry[1]))
        elif len(entry) == 3:
            pairs.append(WidenPair(entry[0], entry[2], entry[1]))
        else:
            raise ValueError(f"kasmina.widen entry {entry}: give [layer, consumer] or [layer, norm, consumer]")
    return pairs


@dataclass(frozen=True)
class PairModules:
    layer: _Layer
    consumer: _Layer
    norm: _Norm | None


def resolve(model: nn.Module, pair: WidenPair) -> PairModules:
    """The pair's modules, checked; ValueError naming the module and what it must be."""
    modules = dict(model.named_modules())
    found: list[nn.Module | None] = []
    for role, name, kinds in (("layer", pair.layer, (nn.Linear, nn.Conv2d)),
                              ("consumer", pair.consumer, (nn.Linear, nn.Conv2d)),
                              ("norm", pair.norm, (nn.BatchNorm1d, nn.BatchNorm2d))):
        if role == "norm" and not name:
            found.append(None)
            continue
        module = modules.get(name)
        if not isinstance(module, kinds):
            what = type(module).__name__ if module is not None else "not a module of the model"
            raise ValueError(f"kasmina.widen {role} {name!r} is {what}; it must be one of "
                             f"{[k.__name__ for k in kinds]}")
        found.append(module)
    layer, consumer, norm = found
    assert isinstance(layer, (nn.Linear, nn.Conv2d)) and isinstance(consumer, (nn.Linear, nn.Conv2d))
    if any(isinstance(m, nn.Conv2d) and m.groups != 1 for m in (layer, consumer)):
        raise ValueError(f"kasmina.widen {pair.layer!r} -> {pair.consumer!r}: grouped convolutions cannot be widened")
    if type(layer) is not type(consumer):
        raise ValueError(f"kasmina.widen {pair.layer!r} is a {type(layer).__name__} but {pair.consumer!r} a "
                         f"{type(consumer).__name__}: widen a Linear into a Linear or a Conv2d into a Conv2d")
    units, inputs = width(layer), _inputs(consumer)
    if units != inputs or (norm is not None and norm.num_features != units):
        raise ValueError(f"kasmina.widen {pair.layer!r} has {units} units but {pair.consumer!r} takes {inputs} inputs"
                         + (f" and {pair.norm!r} {norm.num_features} features" if norm is not None else "")
                         + ": they must match, unit for unit")
    return PairModules(layer, consumer, norm if isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d)) else None)


def width(layer: _Layer) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _inputs(layer: _Layer) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def added_params(modules: PairModules, units: int) -> int:
    """Parameters a widening by `units` adds."""
    per_unit = modules.layer.weight[0].numel() + (1 if modules.layer.bias is not None else 0)
    per_unit += modules.consumer.weight[:, 0].numel()
    per_unit += 2 if modules.norm is not None and modules.norm.affine else 0
    return per_unit * units


def widen(modules: PairModules, units: int, generator: torch.Generator) -> None:
    """Append `units` function-preserving copies of drawn units (see the module docstring)."""
    layer, consumer, norm = modules.layer, modules.consumer, modules.norm
    n = width(layer)
    sources = torch.randint(0, n, (units,), generator=generator).tolist()
    ratios = (0.25 + 0.5 * torch.rand(units, generator=generator, dtype=torch.float64)).tolist()
    with torch.no_grad():
        _set(layer, "weight", torch.cat([layer.weight, layer.weight[sources]]))
        if layer.bias is not None:
            _set(layer, "bias", torch.cat([layer.bias, layer.bias[sources]]))
        if norm is not None:
            _widen_norm(norm, sources)
        outgoing = torch.cat([consumer.weight, torch.zeros_like(consumer.weight[:, :units])], dim=1)
        for offset, (source, ratio) in enumerate(zip(sources, ratios, strict=True)):
            share = outgoing[:, source] * ratio
            outgoing[:, n + offset] = share
            outgoing[:, source] -= share
        _set(consumer, "weight", outgoing)
    _set_width(modules, n + units)


def narrow(modules: PairModules, units: int) -> None:
    """Keep the first `width - units` units (shapes only: the weights are loaded afterwards)."""
    n = width(modules.layer) - units
    layer, consumer, norm = modules.layer, modules.consumer, modules.norm
    with torch.no_grad():
        _set(layer, "weight", layer.weight[:n].clone())
        if layer.bias is not None:
            _set(layer, "bias", layer.bias[:n].clone())
        if norm is not None:
            for name in ("weight", "bias"):
                if getattr(norm, name) is not None:
                    _set(norm, name, getattr(norm, name)[:n].clone())
            for name in ("running_mean", "running_var"):
                if getattr(norm, name) is not None:
                    setattr(norm, name, getattr(norm, name)[:n].clone())
        _set(consumer, "weight", consumer.weight[:, :n].clone())
    _set_width(modules, n)


def parameter_names(model: nn.Module, pair: WidenPair) -> tuple[str, ...]:
    """The names (as in `model.named_parameters()`) of every parameter a widening reshapes."""
    modules = dict(model.named_modules())
    own = [f"{name}.{p}" for name in (pair.layer, pair.norm) if name
           for p, _ in modules[name].named_parameters(recurse=False)]
    return (*own, f"{pair.consumer}.weight")  # the consumer's bias keeps its shape


def _widen_norm(norm: _Norm, sources: list[int]) -> None:
    for name in ("weight", "bias"):
        value = getattr(norm, name)
        if value is not None:
            _set(norm, name, torch.cat([value, value[sources]]))
    for name in ("running_mean", "running_var"):
        value = getattr(norm, name)
        if value is not None:
            setattr(norm, name, torch.cat([value, value[sources]]))


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))


def _set_width(modules: PairModules, n: int) -> None:
    layer, consumer = modules.layer, modules.consumer
    if isinstance(layer, nn.Linear) and isinstance(consumer, nn.Linear):
        layer.out_features, consumer.in_features = n, n
    elif isinstance(layer, nn.Conv2d) and isinstance(consumer, nn.Conv2d):
        layer.out_channels, consumer.in_channels = n, n
    if modules.norm is not None:
        modules.norm.num_features = n


class Widener:
    """The widenable pairs of one model (`kasmina.widen`) and the widenings applied, in order."""

    def __init__(self, model: nn.Module, entries: list[list[str]], *, units: int, layer_seed: int) -> None:
        self.model, self.units, self._layer_seed = model, units, layer_seed
        self.pairs = {p.layer: p for p in parse_pairs(entries)}
        for pair in self.pairs.values():
            resolve(model, pair)  # a pair that cannot be widened is an error now, not at the first command
        self.applied: list[tuple[str, int]] = []  # (layer, units) in the order applied

    def added_params(self, layer: str) -> int | None:
        pair = self.pairs.get(layer)
        return added_params(resolve(self.model, pair), self.units) if pair else None

    def affected_slots(self, layer: str, slots: Sequence[str], shapes: dict[str, tuple[int, ...]]) -> set[str]:
        """Slots whose output carries the layer's units: the layer, the modules after it up to the
        consumer (in registration order), and its ancestors, where their first per-sample
        dimension is that width."""
        pair = self.pairs[layer]
        units = width(resolve(self.model, pair).layer)
        names = [n for n, _ in self.model.named_modules()]
        start, end = names.index(pair.layer), names.index(pair.consumer)
        between = set(names[start:end]) if start < end else {pair.layer}
        return {s for s in slots if (s in between or pair.layer.startswith(f"{s}."))
                and shapes.get(s, (0,))[0] == units}

    def widen(self, layer: str) -> tuple[str, ...]:
        """Widen `layer` by `units`; the names of the parameters it reshaped."""
        pair = self.pairs[layer]
        widen(resolve(self.model, pair), self.units, self._generator(len(self.applied)))
        self.applied.append((layer, self.units))
        return parameter_names(self.model, pair)

    def reconcile(self, target: Sequence[tuple[str, int]]) -> tuple[str, ...]:
        """Narrow and widen until the applied widenings are `target`'s; the reshaped parameter names."""
        common = 0
        while common < min(len(self.applied), len(target)) and self.applied[common] == tuple(target[common]):
            common += 1
        reshaped: set[str] = set()
        for layer, units in reversed(self.applied[common:]):
            narrow(resolve(self.model, self.pairs[layer]), units)
            reshaped.update(parameter_names(self.model, self.pairs[layer]))
        for index, (layer, units) in enumerate(target[common:], start=common):
            widen(resolve(self.model, self.pairs[layer]), units, self._generator(index))
            reshaped.update(parameter_names(self.model, self.pairs[layer]))
        self.applied = [(layer, int(units)) for layer, units in target]
        return tuple(sorted(reshaped))

    def _generator(self, index: int) -> torch.Generator:
        digest = hashlib.sha256(f"{self._layer_seed}:widen:{index}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
