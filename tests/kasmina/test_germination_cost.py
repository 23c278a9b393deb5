"""Kasmina says, before germinating, how many parameters a seed in each free slot would add."""

from __future__ import annotations

import torch

from esper.leyline import SEED_OP_GERMINATE, SEED_STAGE_DORMANT

from .helpers import apply_ok, make_layer


def test_a_free_slots_germination_cost_is_what_germinating_there_adds() -> None:
    layer = make_layer()
    free = {s.seed_id: s for s in layer.export_seed_states() if s.stage == SEED_STAGE_DORMANT}
    predicted = {slot: layer.germination_params(slot) for slot in ("1", "3")}
    assert {slot: free[slot].metrics["germination_params"] for slot in free} == predicted
    before = layer.param_count()
    rng = torch.get_rng_state()
    assert layer.germination_params("1", "lowrank_adapter") != predicted["1"]  # per blueprint
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is untouched
    apply_ok(layer, SEED_OP_GERMINATE, "1")
    assert layer.param_count() - before == predicted["1"]
    assert layer.germination_params("no-such-slot") is None
