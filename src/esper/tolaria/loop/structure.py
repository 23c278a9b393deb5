"""What counts as a change of the model's structure, for the components that redo work only then
(the FLOP count, the compiled graphs): the seeds' (id, stage) pairs from Kasmina's manifest, the
parameter count (a widening reshapes without a stage change) and the trainable count (a freeze)."""

from __future__ import annotations

from esper.contracts import ExecutionLayer

StructureKey = tuple[tuple[tuple[str, str], ...], int, int]


def structure_key(kasmina: ExecutionLayer) -> StructureKey:
    stages = tuple((str(s.get("seed_id", "")), str(s.get("stage", ""))) for s in kasmina.manifest().get("seeds", []))
    params = list(kasmina.model.parameters())
    return stages, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
