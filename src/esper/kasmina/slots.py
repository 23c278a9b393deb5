"""Slots: the host modules seeds hang off, checked once, and the probe forward that learns their shapes."""

from __future__ import annotations

import re

import torch
from torch import nn

SEED_ID = re.compile(r"seed\d+")


def resolve_slots(model: nn.Module, slots: tuple[str, ...]) -> dict[str, nn.Module]:
    """Each slot's module; ValueError naming the bad slot and the valid names."""
    if not slots:
        raise ValueError("KasminaLayer needs at least one slot: pass module names from model.named_modules()")
    if len(set(slots)) != len(slots):
        raise ValueError(f"slots {list(slots)} repeat a name: list each slot once")
    modules = dict(model.named_modules())
    valid = [name for name in modules if name]
    resolved: dict[str, nn.Module] = {}
    for slot in slots:
        if slot not in modules or not slot:
            raise ValueError(f"unknown slot {slot!r}: not a submodule of the model; valid slots: {valid}")
        if SEED_ID.fullmatch(slot):
            raise ValueError(f"slot {slot!r} looks like a seed id (seedN); seed ids and slot names must differ")
        resolved[slot] = modules[slot]
    return resolved


def probe_once(model: nn.Module, example_input: torch.Tensor) -> None:
    """One no-grad forward in eval mode (no BatchNorm statistics change); every module's mode is restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for module, training in modes:
            module.training = training
