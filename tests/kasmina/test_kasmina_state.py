"""Manifest round trips, rollback onto a grown layer, cull freeing parameters, seed-state export."""

from __future__ import annotations

import copy
import gc
import json
import weakref

import torch
from torch.nn import functional as F

from esper.kasmina import KasminaLayer
from esper.leyline import (
    SEED_OP_CULL,
    SEED_OP_EVALUATE,
    SEED_OP_GERMINATE,
    SEED_OP_START_GRAFTING,
    SEED_STAGE_BLENDING,
    SEED_STAGE_DORMANT,
    SEED_STAGE_FOSSILIZED,
    SEED_STAGE_PROBATIONARY,
    SEED_STAGE_TRAINING,
    system_state_packet,
    validate_system_state,
)

from .helpers import apply_ok, cmd, drive_to, make_layer, model_state, states_equal


def _perturb(layer: KasminaLayer) -> None:
    with torch.no_grad():
        for param in layer.model.parameters():
            param.add_(torch.randn_like(param) * 0.1)


def _grown() -> KasminaLayer:
    """seed1 fossilized in slot 1, seed2 culled, seed3 mid-blend in slot 3, weights perturbed."""
    torch.manual_seed(3)
    layer = make_layer()
    drive_to(layer, SEED_STAGE_FOSSILIZED, slot="1")
    apply_ok(layer, SEED_OP_CULL, apply_ok(layer, SEED_OP_GERMINATE, "1"))
    drive_to(layer, SEED_STAGE_TRAINING, slot="3")
    apply_ok(layer, SEED_OP_START_GRAFTING, "seed3")
    layer.on_step()
    _perturb(layer)
    return layer


def test_manifest_round_trip_rebuilds_a_grown_model_with_bit_identical_outputs() -> None:
    grown = _grown()
    manifest = json.loads(json.dumps(grown.manifest()))  # must survive JSON
    saved = grown.model.state_dict()
    torch.manual_seed(99)  # the fresh host starts from different weights
    fresh = make_layer()
    result = fresh.load_manifest(manifest)
    assert result.ok, result.reason
    assert set(result.added_params) == {n for n, _ in grown.model.named_parameters() if n.startswith("kasmina_seeds")}
    fresh.model.load_state_dict(saved)
    x = torch.randn(7, 4)
    assert torch.equal(fresh.model(x), grown.model(x))
    assert fresh.manifest() == grown.manifest()
    assert all(not p.requires_grad for p in fresh.model.kasmina_seeds["seed1"].parameters())
    for layer in (grown, fresh):  # both continue identically
        layer.on_step()
    assert torch.equal(fresh.model(x), grown.model(x))


def test_loading_an_older_manifest_onto_a_grown_layer_rolls_the_structure_back() -> None:
    layer = make_layer()
    seed_id = drive_to(layer, SEED_STAGE_TRAINING, slot="1")
    manifest, saved = copy.deepcopy(layer.manifest()), model_state(layer)
    apply_ok(layer, SEED_OP_GERMINATE, "3")
    apply_ok(layer, SEED_OP_CULL, seed_id)
    result = layer.load_manifest(manifest)
    assert result.ok, result.reason
    assert {n.split(".")[1] for n in result.removed_params} == {"seed2"}
    assert {n.split(".")[1] for n in result.added_params} == {"seed1"}
    layer.model.load_state_dict(saved)
    assert layer.manifest() == manifest
    assert layer.seed_loss_terms(torch.randn(2, 4), torch.tensor([0, 1]), F.cross_entropy)[0].seed_id == seed_id


def test_a_manifest_for_other_slots_is_rejected_and_changes_nothing() -> None:
    layer = make_layer()
    apply_ok(layer, SEED_OP_GERMINATE, "1")
    manifest = layer.manifest()
    manifest["slots"] = ["1"]
    before_state, before_manifest = model_state(layer), layer.manifest()
    result = layer.load_manifest(manifest)
    assert not result.ok and "construct KasminaLayer to match" in result.reason
    assert states_equal(before_state, model_state(layer)) and layer.manifest() == before_manifest
    assert not layer.load_manifest({"version": 1, "seeds": []}).ok


def test_a_manifest_with_two_live_seeds_in_one_slot_is_rejected() -> None:
    layer = make_layer()
    apply_ok(layer, SEED_OP_GERMINATE, "1")
    apply_ok(layer, SEED_OP_GERMINATE, "3")
    manifest = layer.manifest()
    manifest["seeds"][1]["slot"] = "1"
    result = make_layer().load_manifest(manifest)
    assert not result.ok and "more than one live seed in a slot" in result.reason


def test_state_dict_round_trip_restores_counters() -> None:
    layer = make_layer()
    drive_to(layer, SEED_STAGE_BLENDING, slot="3")
    other = make_layer()
    other.load_state_dict(layer.state_dict())
    assert other.manifest() == layer.manifest()


def test_cull_removes_the_seed_parameters_from_the_model_and_frees_them() -> None:
    layer = make_layer()
    seed_id = drive_to(layer, SEED_STAGE_BLENDING, slot="1")
    names = {n for n, _ in layer.model.named_parameters() if n.startswith(f"kasmina_seeds.{seed_id}.")}
    refs = [weakref.ref(p) for p in layer.model.kasmina_seeds[seed_id].parameters()]
    layer.model(torch.randn(2, 4)).sum().backward()
    result = layer.apply_command(cmd(SEED_OP_CULL, seed_id))
    assert result.ok and set(result.removed_params) == names and names
    assert not names & {n for n, _ in layer.model.named_parameters()}
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert len(layer.model[1]._forward_hooks) == 0  # no seed left: no hook cost
    assert [s.stage for s in layer.export_seed_states()] == [SEED_STAGE_DORMANT, SEED_STAGE_DORMANT]


def test_export_lists_free_slots_as_dormant_and_seeds_with_their_metrics() -> None:
    layer = make_layer()
    seed_id = drive_to(layer, SEED_STAGE_PROBATIONARY, slot="3")
    apply_ok(layer, SEED_OP_EVALUATE, seed_id)
    layer.on_epoch_end(6, 0.99, 0.5)
    layer.model(torch.randn(3, 4)).pow(2).sum().backward()
    states = layer.export_seed_states()
    dormant, seed = states
    assert (dormant.seed_id, dormant.stage, dormant.layer_depth) == ("1", SEED_STAGE_DORMANT, 0)
    assert (seed.seed_id, seed.stage, seed.layer_depth) == (seed_id, SEED_STAGE_PROBATIONARY, 1)
    assert {"alpha", "steps_in_stage", "epochs_in_stage", "val_loss_at_stage_entry", "val_loss_delta", "params",
            "in_evaluation", "slot_index"} <= set(seed.metrics)
    assert seed.metrics["alpha"] == 1.0 and seed.metrics["in_evaluation"] == 1.0
    assert abs(seed.metrics["val_loss_delta"] - (0.99 - 1.0) / 1.0) < 1e-6
    assert seed.metrics["epochs_in_stage"] == 2.0 and seed.metrics["val_loss_at_stage_entry"] == 1.0
    grads = [p.grad for p in layer.model.kasmina_seeds[seed_id].parameters()]
    expected = torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)).item()
    assert expected > 0 and abs(seed.gradient_norm - expected) < 1e-4 * expected
    packet = system_state_packet(epoch=6, global_step=10, training_loss=1.0, validation_loss=0.99,
                                 validation_accuracy=0.5, seed_states=states)
    validate_system_state(packet)


def test_seeds_summary_lists_stage_history_by_epoch() -> None:
    layer = make_layer()
    seed_id = drive_to(layer, SEED_STAGE_FOSSILIZED, slot="1")
    (summary,) = layer.seeds_summary()
    assert summary["seed_id"] == seed_id and summary["stage"] == "SEED_STAGE_FOSSILIZED"
    assert [h["stage"] for h in summary["history"]] == [
        "SEED_STAGE_GERMINATED", "SEED_STAGE_TRAINING", "SEED_STAGE_BLENDING", "SEED_STAGE_SHADOWING",
        "SEED_STAGE_PROBATIONARY", "SEED_STAGE_FOSSILIZED",
    ]
    assert summary["history"][-1]["epoch"] == 5
    assert layer.param_count() == sum(p.numel() for p in layer.model.parameters()) > summary["params"] > 0
