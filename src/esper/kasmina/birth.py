"""A grown structure built into a host at birth: the static baseline of a grown run.

`grow_at_birth(layer, manifest)` takes a structure manifest (`KasminaLayer.manifest()` of a
finished run) and builds its structure into a fresh host before training. It widens the host's
layers as the run widened them (Net2Net, `widen.py`, through the layer, whose manifest then
records them), then `build_at_birth(model, manifest)` adds every seed the manifest still holds
(any stage but CULLED) as a fixed part: a child `model.fixed_seeds.<seed_id>` and a forward hook
on its slot that replaces the slot's output `h` by `h + s(h)` for each seed of the slot in
germination order, at full strength (alpha 1) from the first step. These are ordinary host
parameters (not `kasmina_seeds.*`): they train in the host's optimizer group and have no
lifecycle, no own loss and no alpha ramp. Trained from step 0, the result is "the grown run's
final architecture trained statically", the baseline growth is measured against.

Each seed is drawn exactly as Kasmina drew it at germination (the same blueprint, widths and
generator, from the manifest's layer seed), and each widening uses the generator the run widened
with, so the model starts as the bare host's function. A seed still in TRAINING when the run
ended is built too: it is part of the final parameter count, and at full strength it is what the
grown run would have become.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esper.kasmina.blueprints import BlueprintError, build_blueprint
from esper.kasmina.layer import KasminaLayer
from esper.kasmina.lifecycle import SeedRecord
from esper.kasmina.manifest import ManifestError, parse_manifest
from esper.leyline import SEED_STAGE_CULLED

FIXED_CONTAINER = "fixed_seeds"


class FixedSeeds(nn.ModuleDict):
    """`model.fixed_seeds`: the built-in seeds by id. Its forward is the identity, so an
    `nn.Sequential` host (which calls every child in order) passes its input through it unchanged."""

    def forward(self, x: Any) -> Any:
        return x


def seed_generator(layer_seed: int, seed_id: str) -> torch.Generator:
    """The generator Kasmina draws seed `seed_id` of a layer seeded `layer_seed` from."""
    digest = hashlib.sha256(f"{layer_seed}:{seed_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def build_at_birth(model: nn.Module, manifest: Mapping[str, Any]) -> int:
    """Add the manifest's seeds to `model` as fixed, full-strength parts; returns the parameters added.

    Raises ValueError naming the problem (a malformed manifest, a slot the model lacks, a blueprint
    that does not fit) before the model is changed."""
    try:
        parsed = parse_manifest(manifest)
    except ManifestError as exc:
        raise ValueError(f"initial manifest: {exc}") from None
    modules = dict(model.named_modules())
    records = [r for r in parsed.records if r.stage != SEED_STAGE_CULLED]
    missing = sorted({r.slot for r in records if r.slot not in modules or not r.slot})
    if missing:
        raise ValueError(f"initial manifest: slots {missing} are not modules of this {type(model).__name__}; "
                         "build it for the model the manifest was grown on")
    if hasattr(model, FIXED_CONTAINER):
        raise ValueError(f"model already has a `{FIXED_CONTAINER}` attribute: build a manifest into a host once")
    seeds = FixedSeeds({r.seed_id: _build(r, parsed.layer_seed, model) for r in records})
    model.add_module(FIXED_CONTAINER, seeds)
    for slot in dict.fromkeys(r.slot for r in records):  # slots in the order their first seed grew
        chain = [seeds[r.seed_id] for r in records if r.slot == slot]
        modules[slot].register_forward_hook(_full_strength(slot, chain))
    return sum(p.numel() for p in seeds.parameters())


def grow_at_birth(layer: KasminaLayer, manifest: Mapping[str, Any]) -> int:
    """The whole grown structure at birth: the manifest's widenings (through `layer`, with the
    generators the grown run widened with, so the widened host starts as the grown one did), then its
    seeds as fixed parts (`build_at_birth`). Call it before the optimizer is built; returns the
    parameters added. ValueError names the problem before anything changes."""
    try:
        parsed = parse_manifest(manifest)
    except ManifestError as exc:
        raise ValueError(f"initial manifest: {exc}") from None
    if parsed.widenings:
        # Only the widenings: the layer's own records stay empty (no seed of its own grows here).
        widened_only = {**manifest, "seeds": [], "seed_counter": 0, "epoch": 0, "last_val_loss": None}
        before = sum(p.numel() for p in layer.model.parameters())
        result = layer.load_manifest(widened_only)
        if not result.ok:
            raise ValueError(f"initial manifest: its widenings do not fit this host: {result.reason}")
        widened = sum(p.numel() for p in layer.model.parameters()) - before
    else:
        widened = 0
    return widened + build_at_birth(layer.model, manifest)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A manifest JSON file: a bare manifest, or a summary.json holding one under `final_manifest`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"initial manifest {path} does not exist; give the manifest JSON a grown run wrote "
                         "(its summary.json's final_manifest)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"initial manifest {path} is not readable JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("final_manifest"), dict):
        return dict(data["final_manifest"])
    if not isinstance(data, dict):
        raise ValueError(f"initial manifest {path} holds {type(data).__name__}, not a manifest object")
    return data


def _build(record: SeedRecord, layer_seed: int, model: nn.Module) -> nn.Module:
    try:
        generator = seed_generator(layer_seed, record.seed_id)
        body = build_blueprint(record.blueprint, record.shape, record.spec(), generator)
    except BlueprintError as exc:
        raise ValueError(f"initial manifest: {record.seed_id} in slot {record.slot!r}: {exc}") from None
    anchor = next(model.parameters(), None)  # device and dtype follow the host's
    return body if anchor is None else body.to(device=anchor.device, dtype=anchor.dtype)


def _full_strength(slot: str, chain: list[nn.Module]) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"slot {slot!r} outputs {type(output).__name__}; built-in seeds need a tensor output")
        h = output
        for seed in chain:
            h = h + seed(h)
        return h

    return hook
