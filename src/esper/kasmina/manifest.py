"""Kasmina's structure manifest: JSON form of the seed records, and its strict parser.

Format (version 2): {"version", "layer_seed", "slots", "seed_counter", "epoch", "last_val_loss",
"shapes": {slot: [per-sample dims]}, "seeds": [record, ...], "widenings": [[layer, units], ...]}
(widenings optional: a manifest without them widened nothing) where a record holds the SeedRecord
fields with stages written as Leyline enum names (e.g. "SEED_STAGE_BLENDING") and history as
[[epoch, stage name], ...]. Weights are not in the manifest; they are in the model state_dict.
Version 1 records (before `lowrank_adapter` and `attention_head`) lack `rank`, `head_dim` and
`causal`; they still load, with the defaults, which their blueprints never read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from esper.kasmina.blueprints import AUTO
from esper.kasmina.lifecycle import SeedRecord, stage_name
from esper.leyline import SeedLifecycleStage

MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)
_ADDED_IN_V2 = {"rank": 8, "head_dim": 16, "causal": True}  # record fields a version 1 manifest lacks


class ManifestError(ValueError):
    """A manifest is malformed or of another version."""


@dataclass(frozen=True)
class ParsedManifest:
    layer_seed: int
    slots: tuple[str, ...]
    seed_counter: int
    epoch: int
    last_val_loss: float | None
    shapes: dict[str, tuple[int, ...]]
    records: list[SeedRecord]
    widenings: tuple[tuple[str, int], ...] = ()  # (layer, units) in the order applied (widen.py)


def _record_to_json(record: SeedRecord) -> dict[str, Any]:
    data: dict[str, Any] = {f.name: getattr(record, f.name) for f in fields(record)}
    data["shape"] = list(record.shape)
    data["stage"] = stage_name(record.stage)
    data["history"] = [[epoch, stage_name(stage)] for epoch, stage in record.history]
    return data


def manifest_to_json(
    *,
    layer_seed: int,
    slots: Sequence[str],
    seed_counter: int,
    epoch: int,
    last_val_loss: float | None,
    shapes: Mapping[str, tuple[int, ...]],
    records: Sequence[SeedRecord],
    widenings: Sequence[tuple[str, int]] = (),
) -> dict[str, Any]:
    return {
        "version": MANIFEST_VERSION,
        "layer_seed": layer_seed,
        "slots": list(slots),
        "seed_counter": seed_counter,
        "epoch": epoch,
        "last_val_loss": last_val_loss,
        "shapes": {slot: list(shape) for slot, shape in shapes.items()},
        "seeds": [_record_to_json(r) for r in records],
        "widenings": [[layer, units] for layer, units in widenings],
    }


def _stage(name: Any) -> int:
    try:
        return int(SeedLifecycleStage.Value(str(name)))
    except ValueError as exc:
        raise ManifestError(f"unknown stage {name!r}") from exc


def _record_from_json(data: Mapping[str, Any], version: int) -> SeedRecord:
    values = {**_ADDED_IN_V2, **data} if version == 1 else dict(data)
    names = {f.name for f in fields(SeedRecord)}
    missing, extra = names - set(values), set(values) - names
    if missing or extra:
        raise ManifestError(f"seed record has missing fields {sorted(missing)} and unknown fields {sorted(extra)}")
    if not isinstance(values["causal"], bool):
        raise ManifestError(f"seed record field causal must be true or false, got {values['causal']!r}")
    values["shape"] = tuple(int(d) for d in data["shape"])
    values["stage"] = _stage(data["stage"])
    values["history"] = [(int(e), _stage(s)) for e, s in data["history"]]
    return SeedRecord(**values)


def parse_manifest(manifest: Mapping[str, Any]) -> ParsedManifest:
    """Validate and convert a manifest; raises ManifestError naming the first problem."""
    version = manifest.get("version")
    if version not in READABLE_VERSIONS:
        raise ManifestError(f"manifest version {version!r} is not one of {list(READABLE_VERSIONS)}")
    try:
        records = [_record_from_json(r, version) for r in manifest["seeds"]]
        last = manifest["last_val_loss"]
        parsed = ParsedManifest(
            layer_seed=int(manifest["layer_seed"]),
            slots=tuple(str(s) for s in manifest["slots"]),
            seed_counter=int(manifest["seed_counter"]),
            epoch=int(manifest["epoch"]),
            last_val_loss=None if last is None else float(last),
            shapes={str(k): tuple(int(d) for d in v) for k, v in manifest["shapes"].items()},
            records=records,
            widenings=tuple((str(layer), int(units)) for layer, units in manifest.get("widenings", [])),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ManifestError):
            raise
        raise ManifestError(f"malformed manifest: {exc!r}") from exc
    unresolved = [r.seed_id for r in records if r.blueprint == AUTO]
    if unresolved:
        raise ManifestError(f"seeds {unresolved} record blueprint 'auto'; a manifest records the blueprint it picked")
    ids = [r.seed_id for r in records]
    if len(set(ids)) != len(ids):
        raise ManifestError(f"manifest repeats seed ids: {ids}")
    unknown = [r.slot for r in records if r.slot not in parsed.slots]
    if unknown:
        raise ManifestError(f"seeds reference slots {unknown} that the manifest does not list")
    live_slots = [r.slot for r in records if r.live]
    if len(set(live_slots)) != len(live_slots):
        raise ManifestError(f"manifest puts more than one live seed in a slot: live seeds' slots {live_slots}")
    if parsed.seed_counter < len(records):
        raise ManifestError(f"seed_counter {parsed.seed_counter} is below the {len(records)} seeds listed")
    return parsed
