"""Every legal and illegal seed transition, the gates, and 'a rejected command changes nothing'."""

from __future__ import annotations

import copy

import pytest
import torch

from esper.kasmina import KasminaLayer
from esper.leyline import (
    COMMAND_PAUSE,
    SEED_OP_CANCEL,
    SEED_OP_CULL,
    SEED_OP_EVALUATE,
    SEED_OP_FINE_TUNE,
    SEED_OP_FOSSILIZE,
    SEED_OP_GERMINATE,
    SEED_OP_STABILIZE,
    SEED_OP_START_GRAFTING,
    SEED_OP_START_TRAINING,
    SEED_STAGE_BLENDING,
    SEED_STAGE_CULLED,
    SEED_STAGE_FOSSILIZED,
    SEED_STAGE_GERMINATED,
    SEED_STAGE_PROBATIONARY,
    SEED_STAGE_SHADOWING,
    SEED_STAGE_TRAINING,
    SeedLifecycleStage,
    SeedOperation,
    adaptation_command,
    noop_command,
)

from .helpers import apply_ok, cmd, drive_to, make_layer, model_state, states_equal

STAGES = [SEED_STAGE_GERMINATED, SEED_STAGE_TRAINING, SEED_STAGE_BLENDING, SEED_STAGE_SHADOWING,
          SEED_STAGE_PROBATIONARY, SEED_STAGE_FOSSILIZED, SEED_STAGE_CULLED]
OPS = [SEED_OP_START_TRAINING, SEED_OP_START_GRAFTING, SEED_OP_STABILIZE, SEED_OP_EVALUATE, SEED_OP_FINE_TUNE,
       SEED_OP_FOSSILIZE, SEED_OP_CULL, SEED_OP_CANCEL]

# The expected table, written out independently of the implementation's TRANSITIONS.
LEGAL: dict[tuple[int, int], int] = {
    (SEED_STAGE_GERMINATED, SEED_OP_START_TRAINING): SEED_STAGE_TRAINING,
    (SEED_STAGE_GERMINATED, SEED_OP_CULL): SEED_STAGE_CULLED,
    (SEED_STAGE_GERMINATED, SEED_OP_CANCEL): SEED_STAGE_CULLED,
    (SEED_STAGE_TRAINING, SEED_OP_START_GRAFTING): SEED_STAGE_BLENDING,
    (SEED_STAGE_TRAINING, SEED_OP_CULL): SEED_STAGE_CULLED,
    (SEED_STAGE_TRAINING, SEED_OP_CANCEL): SEED_STAGE_CULLED,
    (SEED_STAGE_BLENDING, SEED_OP_STABILIZE): SEED_STAGE_SHADOWING,
    (SEED_STAGE_BLENDING, SEED_OP_CULL): SEED_STAGE_CULLED,
    (SEED_STAGE_SHADOWING, SEED_OP_EVALUATE): SEED_STAGE_SHADOWING,
    (SEED_STAGE_SHADOWING, SEED_OP_FINE_TUNE): SEED_STAGE_PROBATIONARY,
    (SEED_STAGE_SHADOWING, SEED_OP_CULL): SEED_STAGE_CULLED,
    (SEED_STAGE_PROBATIONARY, SEED_OP_EVALUATE): SEED_STAGE_PROBATIONARY,
    (SEED_STAGE_PROBATIONARY, SEED_OP_FOSSILIZE): SEED_STAGE_FOSSILIZED,
    (SEED_STAGE_PROBATIONARY, SEED_OP_CULL): SEED_STAGE_CULLED,
}
CASES = [(s, o) for s in STAGES for o in OPS]


def _case_id(case: tuple[int, int]) -> str:
    stage, op = case
    return f"{SeedLifecycleStage.Name(stage)}-{SeedOperation.Name(op)}"  # type: ignore[arg-type]


def _snapshot(layer: KasminaLayer) -> tuple[dict[str, torch.Tensor], dict[str, object], list[str]]:
    return model_state(layer), copy.deepcopy(layer.manifest()), [n for n, _ in layer.model.named_parameters()]


def _unchanged(layer: KasminaLayer, before: tuple[dict[str, torch.Tensor], dict[str, object], list[str]]) -> bool:
    after = _snapshot(layer)
    return states_equal(before[0], after[0]) and before[1] == after[1] and before[2] == after[2]


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_transition_table_accepts_legal_and_rejects_illegal_operations(case: tuple[int, int]) -> None:
    stage, op = case
    layer = make_layer()
    seed_id = drive_to(layer, stage)
    before = _snapshot(layer)
    result = layer.apply_command(cmd(op, seed_id))
    if case in LEGAL:
        assert result.ok, result.reason
        assert layer.seed_record(seed_id).stage == LEGAL[case]
    else:
        assert not result.ok
        assert ("illegal transition" in result.reason) or ("was culled" in result.reason)
        assert _unchanged(layer, before)


def test_start_grafting_gate_needs_min_training_steps(layer: KasminaLayer) -> None:
    seed_id = apply_ok(layer, SEED_OP_GERMINATE, "1")
    apply_ok(layer, SEED_OP_START_TRAINING, seed_id)
    layer.on_step()
    before = _snapshot(layer)
    result = layer.apply_command(cmd(SEED_OP_START_GRAFTING, seed_id))
    assert not result.ok and "min_training_steps" in result.reason and "1 isolated steps, needs 2" in result.reason
    assert _unchanged(layer, before)
    layer.on_step()
    assert layer.apply_command(cmd(SEED_OP_START_GRAFTING, seed_id)).ok


def test_stabilize_gate_needs_alpha_to_reach_one(layer: KasminaLayer) -> None:
    seed_id = drive_to(layer, SEED_STAGE_TRAINING)
    apply_ok(layer, SEED_OP_START_GRAFTING, seed_id)
    layer.on_step()
    result = layer.apply_command(cmd(SEED_OP_STABILIZE, seed_id))
    assert not result.ok and "alpha_complete" in result.reason
    layer.on_step()
    layer.on_step()
    assert layer.seed_record(seed_id).alpha == 1.0
    assert layer.apply_command(cmd(SEED_OP_STABILIZE, seed_id)).ok


def test_fossilize_gate_rejects_a_seed_whose_validation_loss_got_worse(layer: KasminaLayer) -> None:
    seed_id = drive_to(layer, SEED_STAGE_PROBATIONARY)  # blending began at val loss 1.0
    layer.on_epoch_end(6, 1.02, 0.5)  # worse than 1.0 * (1 + 0.01)
    before = _snapshot(layer)
    result = layer.apply_command(cmd(SEED_OP_FOSSILIZE, seed_id))
    assert not result.ok and "no_harm" in result.reason and "1.02" in result.reason
    assert _unchanged(layer, before)
    layer.on_epoch_end(7, 1.005, 0.5)  # within tolerance
    assert layer.apply_command(cmd(SEED_OP_FOSSILIZE, seed_id)).ok


def test_fossilize_gate_needs_a_validation_loss_from_blend_start() -> None:
    layer = make_layer()
    seed_id = apply_ok(layer, SEED_OP_GERMINATE, "1")
    apply_ok(layer, SEED_OP_START_TRAINING, seed_id)
    for _ in range(2):
        layer.on_step()
    apply_ok(layer, SEED_OP_START_GRAFTING, seed_id)  # no on_epoch_end yet: no baseline
    for _ in range(3):
        layer.on_step()
    apply_ok(layer, SEED_OP_STABILIZE, seed_id)
    apply_ok(layer, SEED_OP_FINE_TUNE, seed_id)
    layer.on_epoch_end(1, 0.5, 0.5)
    result = layer.apply_command(cmd(SEED_OP_FOSSILIZE, seed_id))
    assert not result.ok and "call on_epoch_end before grafting" in result.reason


def test_evaluate_opens_a_window_of_evaluation_steps_and_cannot_be_reopened(layer: KasminaLayer) -> None:
    seed_id = drive_to(layer, SEED_STAGE_SHADOWING)
    apply_ok(layer, SEED_OP_EVALUATE, seed_id)
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    assert layer.seed_loss_terms(x, y, torch.nn.functional.cross_entropy)[0].in_evaluation
    assert not layer.apply_command(cmd(SEED_OP_EVALUATE, seed_id)).ok
    layer.on_step()
    assert layer.seed_record(seed_id).in_evaluation
    layer.on_step()
    assert not layer.seed_record(seed_id).in_evaluation
    assert not layer.seed_loss_terms(x, y, torch.nn.functional.cross_entropy)[0].in_evaluation


@pytest.mark.parametrize(
    ("target", "blueprint", "expected"),
    [
        ("nope", "", "unknown slot 'nope'"),
        ("seed1", "", "unknown slot 'seed1'"),
        ("1", "no_such_blueprint", "unknown blueprint 'no_such_blueprint'"),
        ("1", "conv_residual", "conv_residual does not fit per-sample shape (8,): it needs (C, H, W) conv maps; "
                               "blueprints that fit (8,): bottleneck_adapter, lowrank_adapter, residual_mlp"),
        ("1", "attention_head", "attention_head does not fit per-sample shape (8,): it needs (T, C) token"),
    ],
)
def test_germinate_errors_name_the_problem_and_change_nothing(
    layer: KasminaLayer, target: str, blueprint: str, expected: str
) -> None:
    before = _snapshot(layer)
    result = layer.apply_command(cmd(SEED_OP_GERMINATE, target, blueprint))
    assert not result.ok and expected in result.reason
    assert _unchanged(layer, before)
    assert layer.manifest()["seed_counter"] == 0


def test_germinate_into_an_occupied_slot_is_rejected(layer: KasminaLayer) -> None:
    apply_ok(layer, SEED_OP_GERMINATE, "1")
    before = _snapshot(layer)
    result = layer.apply_command(cmd(SEED_OP_GERMINATE, "1"))
    assert not result.ok and "occupied by seed1" in result.reason
    assert _unchanged(layer, before)


def test_unknown_seed_id_is_an_error_that_changes_nothing(layer: KasminaLayer) -> None:
    apply_ok(layer, SEED_OP_GERMINATE, "1")
    before = _snapshot(layer)
    result = layer.apply_command(cmd(SEED_OP_START_TRAINING, "seed9"))
    assert not result.ok and "'seed9' is unknown" in result.reason and "seed1" in result.reason
    assert _unchanged(layer, before)


def test_non_seed_commands_succeed_and_change_nothing(layer: KasminaLayer) -> None:
    apply_ok(layer, SEED_OP_GERMINATE, "3")
    before = _snapshot(layer)
    for command in (noop_command(issued_by="test", reason="idle"), adaptation_command(COMMAND_PAUSE, issued_by="t")):
        result = layer.apply_command(command)
        assert result.ok and not result.structure_changed
    assert _unchanged(layer, before)


def test_germinate_before_any_forward_pass_explains_how_to_fix_it() -> None:
    from esper.kasmina import KasminaLayer as Layer

    from .helpers import CONFIG, make_host

    model = make_host()
    layer = Layer(model, ["1"], config=CONFIG)
    result = layer.apply_command(cmd(SEED_OP_GERMINATE, "1"))
    assert not result.ok and "example_input" in result.reason
    model(torch.zeros(2, 4))  # the one-time probe records the shape
    assert layer.apply_command(cmd(SEED_OP_GERMINATE, "1")).ok
    assert len(model[1]._forward_hooks) == 1  # probe gone, the seed's hook in place


def test_seed_ids_are_assigned_in_order_and_slots_free_after_fossilize_or_cull(layer: KasminaLayer) -> None:
    first = drive_to(layer, SEED_STAGE_FOSSILIZED, slot="1")
    second = apply_ok(layer, SEED_OP_GERMINATE, "1")
    apply_ok(layer, SEED_OP_CULL, second)
    third = apply_ok(layer, SEED_OP_GERMINATE, "1")
    assert (first, second, third) == ("seed1", "seed2", "seed3")


def test_unknown_slot_names_are_rejected_at_construction_with_the_valid_ones() -> None:
    from .helpers import make_host

    with pytest.raises(ValueError, match=r"unknown slot 'encoder\.9'.*valid slots: \['0', '1', '2', '3', '4'\]"):
        KasminaLayer(make_host(), ["encoder.9"])
