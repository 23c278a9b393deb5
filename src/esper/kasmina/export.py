"""Seed records -> Leyline SeedState messages for Tamiyo's SystemStatePacket."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from esper.kasmina.lifecycle import SeedRecord
from esper.leyline import SEED_STAGE_DORMANT, SeedState


def val_loss_delta(record: SeedRecord, val_loss: float | None) -> float:
    """Relative change of val loss since the seed's reference point (blend start, else germination).

    Positive means validation got worse. 0.0 when either loss is unknown.
    """
    ref = record.reference_val_loss()
    if ref is None or val_loss is None:
        return 0.0
    return (val_loss - ref) / max(abs(ref), 1e-12)


def gradient_norms(modules: Mapping[str, nn.Module]) -> dict[str, float]:
    """L2 norm of each seed's current gradients, with a single device sync for all seeds."""
    owners: list[str] = []
    norms: list[torch.Tensor] = []
    for seed_id, module in modules.items():
        for param in module.parameters():
            if param.grad is not None:
                owners.append(seed_id)
                norms.append(torch.linalg.vector_norm(param.grad.detach().float()))
    squares: dict[str, float] = {seed_id: 0.0 for seed_id in modules}
    if norms:
        device = norms[0].device
        values = torch.stack([n.to(device) for n in norms]).tolist()  # the one sync
        for seed_id, value in zip(owners, values, strict=True):
            squares[seed_id] += value * value
    return {seed_id: sq**0.5 for seed_id, sq in squares.items()}


def seed_states(
    free_slots: Sequence[tuple[int, str]],
    records: Sequence[SeedRecord],
    modules: Mapping[str, nn.Module],
    slots: Sequence[str],
    val_loss: float | None,
    attribution: Mapping[str, Mapping[str, float]] | None = None,
    germination_params: Mapping[str, int] | None = None,
) -> list[SeedState]:
    """DORMANT states for free slots (seed_id = slot name, layer_depth = slot index, and the parameters
    a germination there would add as `germination_params`), then the seeds; a seed with a measured
    attribution carries it as `attribution_<name>` metrics."""
    costs = germination_params or {}
    states = [
        SeedState(seed_id=slot, stage=SEED_STAGE_DORMANT, layer_depth=index, metrics={
            "slot_index": float(index), **({"germination_params": float(costs[slot])} if slot in costs else {})})
        for index, slot in free_slots
    ]
    grads = gradient_norms(modules)
    for record in records:
        index = slots.index(record.slot)
        entry = record.val_loss_at_stage_entry
        metrics = {
            "alpha": record.alpha,
            "steps_in_stage": float(record.steps_in_stage),
            "epochs_in_stage": float(record.epochs_in_stage),
            "val_loss_at_stage_entry": float("nan") if entry is None else entry,
            "val_loss_delta": val_loss_delta(record, val_loss),
            "params": float(sum(p.numel() for p in modules[record.seed_id].parameters())),
            "in_evaluation": 1.0 if record.in_evaluation else 0.0,
            "slot_index": float(index),
        }
        for name, value in (attribution or {}).get(record.seed_id, {}).items():
            metrics[f"attribution_{name}"] = value
        state = SeedState(
            seed_id=record.seed_id, gradient_norm=grads[record.seed_id], layer_depth=index, metrics=metrics,
            age_epochs=record.age_epochs,
        )
        state.stage = record.stage  # type: ignore[assignment]
        states.append(state)
    return states
