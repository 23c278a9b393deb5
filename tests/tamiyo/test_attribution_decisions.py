"""HeuristicTamiyo's fossilize, cull and slot choices from attribution and the parameter budget."""

from __future__ import annotations

from esper.leyline import (
    COMMAND_SEED,
    SEED_OP_CULL,
    SEED_OP_FOSSILIZE,
    SEED_OP_GERMINATE,
    SEED_STAGE_DORMANT,
    SEED_STAGE_PROBATIONARY,
    SEED_STAGE_SHADOWING,
    AdaptationCommand,
    SeedState,
    SystemStatePacket,
    is_noop,
    system_state_packet,
)
from esper.tamiyo import HeuristicTamiyo, TamiyoConfig

CONFIG = TamiyoConfig(plateau_window=2, cooldown_epochs=0, probation_epochs=2, probation_patience=3,
                      cull_attribution=0.02, fossilize_attribution=0.0)


def _seed(stage: int, *, slot: int = 0, **metrics: float) -> SeedState:
    state = SeedState(seed_id="seed1", age_epochs=5,
                      metrics={"alpha": 1.0, "val_loss_delta": 0.0, "slot_index": float(slot), **metrics})
    state.stage = stage  # type: ignore[assignment]
    return state


def _free(slot: str, depth: int, cost: float | None = None) -> SeedState:
    metrics = {"slot_index": float(depth), **({"germination_params": cost} if cost is not None else {})}
    return SeedState(seed_id=slot, stage=SEED_STAGE_DORMANT, layer_depth=depth, metrics=metrics)


def _packet(epoch: int, seeds: list[SeedState], *, val_loss: float = 1.0, params: float = 1000.0) -> SystemStatePacket:
    return system_state_packet(epoch=epoch, global_step=epoch, training_loss=val_loss, validation_loss=val_loss,
                               validation_accuracy=0.5, seed_states=seeds, training_metrics={"param_count": params})


def _op(command: AdaptationCommand) -> tuple[int, str]:
    assert command.command_type == COMMAND_SEED, command.annotations["reason"]
    return command.seed_operation.operation, command.target_seed_id


def test_a_seed_that_pays_is_fossilized() -> None:
    seed = _seed(SEED_STAGE_PROBATIONARY, epochs_in_stage=2, attribution_loss=0.05)
    assert _op(HeuristicTamiyo(CONFIG).evaluate_epoch(_packet(0, [seed]))) == (SEED_OP_FOSSILIZE, "seed1")


def test_a_seed_the_model_is_better_without_is_culled_not_fossilized() -> None:
    for stage in (SEED_STAGE_SHADOWING, SEED_STAGE_PROBATIONARY):
        seed = _seed(stage, epochs_in_stage=2, attribution_loss=-0.03)
        command = HeuristicTamiyo(CONFIG).evaluate_epoch(_packet(0, [seed]))
        assert _op(command) == (SEED_OP_CULL, "seed1")
        assert "attribution_loss -0.03" in command.annotations["reason"]


def test_a_seed_that_contributes_nothing_waits_in_probation_then_is_culled() -> None:
    tamiyo = HeuristicTamiyo(CONFIG)
    waiting = _seed(SEED_STAGE_PROBATIONARY, epochs_in_stage=4, attribution_loss=0.0)
    assert is_noop(tamiyo.evaluate_epoch(_packet(0, [waiting])))  # never fossilized without paying
    late = _seed(SEED_STAGE_PROBATIONARY, epochs_in_stage=5, attribution_loss=0.0)
    command = tamiyo.evaluate_epoch(_packet(1, [late]))
    assert _op(command) == (SEED_OP_CULL, "seed1") and "does not pay" in command.annotations["reason"]


def test_without_attribution_in_the_packet_fossilize_follows_the_loss_rule_alone() -> None:
    seed = _seed(SEED_STAGE_PROBATIONARY, epochs_in_stage=2)
    assert _op(HeuristicTamiyo(CONFIG).evaluate_epoch(_packet(0, [seed])))[0] == SEED_OP_FOSSILIZE


def _germinate(tamiyo: HeuristicTamiyo, slots: list[SeedState], *, params: float = 1000.0) -> AdaptationCommand:
    command = None
    for epoch in range(3):  # a flat loss: plateaued at the third epoch
        command = tamiyo.evaluate_epoch(_packet(epoch, slots, params=params))
    assert command is not None
    return command


def test_germination_skips_a_slot_whose_seed_would_exceed_the_parameter_budget() -> None:
    tamiyo = HeuristicTamiyo(CONFIG.model_copy(update={"max_params": 1500}))
    command = _germinate(tamiyo, [_free("deep", 1, 300.0), _free("shallow", 0, 800.0)])
    assert _op(command) == (SEED_OP_GERMINATE, "deep")


def test_no_germination_when_no_seed_fits_the_budget() -> None:
    tamiyo = HeuristicTamiyo(CONFIG.model_copy(update={"max_params": 1500}))
    command = _germinate(tamiyo, [_free("a", 0, 800.0), _free("b", 1, 600.0)])
    assert is_noop(command)
    assert command.annotations["reason"].startswith("noop: over budget: ")


def test_a_slot_whose_seed_was_culled_is_chosen_after_the_others() -> None:
    tamiyo = HeuristicTamiyo(CONFIG)
    bad = _seed(SEED_STAGE_SHADOWING, slot=0, attribution_loss=-0.5)
    assert _op(tamiyo.evaluate_epoch(_packet(0, [bad, _free("b", 1)])))[0] == SEED_OP_CULL
    command = _germinate(tamiyo, [_free("a", 0), _free("b", 1)])
    assert _op(command) == (SEED_OP_GERMINATE, "b")
    restored = HeuristicTamiyo(CONFIG)
    restored.load_state_dict(tamiyo.state_dict())  # the slot's record survives a snapshot
    assert restored.state_dict()["slot_culls"] == {0: 1}


def _rolled_back(packet: SystemStatePacket, op: int, target: str, kind: str = "loss_collapse") -> SystemStatePacket:
    packet.rolled_back_commands.add(command_id="c1", target_seed_id=target, operation=op, applied_epoch=1,  # type: ignore[arg-type]
                                    reason=f"major {kind}: ...", incident_kind=kind)
    return packet


def test_a_mutation_undone_by_a_step_fault_teaches_nothing() -> None:
    tamiyo = HeuristicTamiyo(CONFIG)
    seed = _seed(SEED_STAGE_SHADOWING, epochs_in_stage=0)
    command = tamiyo.evaluate_epoch(_rolled_back(_packet(0, [seed]), SEED_OP_FOSSILIZE, "seed1", "loss_nonfinite"))
    assert is_noop(command)
    assert tamiyo.state_dict()["doomed"] == [] and tamiyo.state_dict()["slot_culls"] == {}


def test_a_rolled_back_germination_counts_against_its_slot_and_restarts_the_cooldown() -> None:
    tamiyo = HeuristicTamiyo(CONFIG.model_copy(update={"cooldown_epochs": 2}))
    slots = [_free("a", 0), _free("b", 1)]
    tamiyo.evaluate_epoch(_packet(0, slots))
    answer = tamiyo.evaluate_epoch(_rolled_back(_packet(1, slots), SEED_OP_GERMINATE, "a"))
    assert is_noop(answer) and "cooling down" in answer.annotations["reason"]
    assert tamiyo.state_dict()["slot_culls"] == {0: 1}
    command = tamiyo.evaluate_epoch(_packet(3, slots))
    assert _op(command) == (SEED_OP_GERMINATE, "b")  # not the slot whose seed collapsed the model


def test_a_seed_whose_lifecycle_command_was_rolled_back_is_culled() -> None:
    tamiyo = HeuristicTamiyo(CONFIG)
    training = _seed(SEED_STAGE_SHADOWING, epochs_in_stage=0)
    command = tamiyo.evaluate_epoch(_rolled_back(_packet(0, [training]), SEED_OP_FOSSILIZE, "seed1"))
    assert _op(command) == (SEED_OP_CULL, "seed1") and "rollback undid" in command.annotations["reason"]
    assert tamiyo.state_dict()["doomed"] == []


def test_a_seed_the_rollback_removed_altogether_is_not_culled_when_its_id_comes_back() -> None:
    tamiyo = HeuristicTamiyo(CONFIG)
    slots = [_free("a", 0), _free("b", 1)]
    packet = _rolled_back(_packet(1, slots), SEED_OP_GERMINATE, "a")
    packet.rolled_back_commands.add(command_id="c2", target_seed_id="seed1", operation=SEED_OP_FOSSILIZE,  # type: ignore[arg-type]
                                    applied_epoch=2, reason="major loss_collapse: ...", incident_kind="loss_collapse")
    tamiyo.evaluate_epoch(packet)  # the restored state holds no seed1: its germination was undone too
    assert tamiyo.state_dict()["doomed"] == []
    reborn = _seed(SEED_STAGE_SHADOWING, epochs_in_stage=0)  # a new seed, given the freed id seed1
    assert not _is_cull(tamiyo.evaluate_epoch(_packet(2, [reborn])))


def _is_cull(command: AdaptationCommand) -> bool:
    return command.command_type == COMMAND_SEED and command.seed_operation.operation == SEED_OP_CULL


def test_no_germination_once_the_training_flop_budget_is_spent() -> None:
    tamiyo = HeuristicTamiyo(CONFIG.model_copy(update={"max_flops": 1e9}))
    slots = [_free("a", 0)]
    command = None
    for epoch in range(3):
        packet = _packet(epoch, slots)
        packet.training_metrics["flops_total"] = 2e9
        command = tamiyo.evaluate_epoch(packet)
    assert command is not None and is_noop(command)
    assert command.annotations["reason"].startswith("noop: over FLOP budget: 2e+09 training FLOPs spent")
    assert _op(_germinate(HeuristicTamiyo(CONFIG.model_copy(update={"max_flops": 1e9})), slots))[0] == SEED_OP_GERMINATE


def test_widen_growth_widens_its_layers_in_turn_and_needs_them_named() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs tamiyo.widen_layers"):
        TamiyoConfig(growth="widen")
    tamiyo = HeuristicTamiyo(CONFIG.model_copy(update={"growth": "widen", "widen_layers": ["fc", "conv"]}))
    targets = []
    for epoch in range(6):
        command = tamiyo.evaluate_epoch(_packet(epoch, []))  # no free slot needed: no seed is grown
        if not is_noop(command):
            assert command.seed_operation.blueprint_id == "net2wider"
            targets.append(command.target_seed_id)
    assert targets[:3] == ["fc", "conv", "fc"]
