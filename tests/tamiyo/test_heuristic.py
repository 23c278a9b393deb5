"""HeuristicTamiyo driven with synthetic packets: the commands it emits and why."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from esper.leyline import (
    COMMAND_SEED,
    SEED_OP_CULL,
    SEED_OP_FINE_TUNE,
    SEED_OP_FOSSILIZE,
    SEED_OP_GERMINATE,
    SEED_OP_STABILIZE,
    SEED_OP_START_GRAFTING,
    SEED_OP_START_TRAINING,
    SEED_STAGE_BLENDING,
    SEED_STAGE_DORMANT,
    SEED_STAGE_FOSSILIZED,
    SEED_STAGE_GERMINATED,
    SEED_STAGE_PROBATIONARY,
    SEED_STAGE_SHADOWING,
    SEED_STAGE_TRAINING,
    AdaptationCommand,
    SeedState,
    SystemStatePacket,
    is_noop,
    system_state_packet,
    validate_command,
)
from esper.tamiyo import HeuristicTamiyo, TamiyoConfig

CONFIG = TamiyoConfig(plateau_window=2, plateau_threshold=0.01, max_live_seeds=1, cooldown_epochs=3,
                      min_training_epochs=2, shadow_epochs=1, probation_epochs=2, fossilize_tolerance=0.01,
                      cull_tolerance=0.05)


def _free(slot: str, depth: int) -> SeedState:
    return SeedState(seed_id=slot, stage=SEED_STAGE_DORMANT, layer_depth=depth)


def _seed(seed_id: str, stage: int, *, age: int = 1, **metrics: float) -> SeedState:
    state = SeedState(seed_id=seed_id, age_epochs=age, metrics={"epochs_in_stage": 0.0, **metrics})
    state.stage = stage  # type: ignore[assignment]
    return state


def _packet(epoch: int, val_loss: float, seeds: list[SeedState], *, conservative: bool = False) -> SystemStatePacket:
    return system_state_packet(epoch=epoch, global_step=epoch * 10, training_loss=val_loss, validation_loss=val_loss,
                               validation_accuracy=0.5, seed_states=seeds, conservative_mode=conservative)


def _run(tamiyo: HeuristicTamiyo, losses: list[float], seeds: list[SeedState], **kw: bool) -> AdaptationCommand:
    command = None
    for epoch, loss in enumerate(losses):
        command = tamiyo.evaluate_epoch(_packet(epoch, loss, seeds, **kw))
    assert command is not None
    validate_command(command)
    assert command.issued_by == "tamiyo" and command.annotations["reason"]
    assert command.command_id and command.issued_at.seconds > 0
    return command


def _op(command: AdaptationCommand) -> tuple[int, str]:
    assert command.command_type == COMMAND_SEED
    return command.seed_operation.operation, command.target_seed_id


def test_plateau_germinates_the_shallowest_free_slot_leaving_the_blueprint_to_kasmina() -> None:
    command = _run(HeuristicTamiyo(CONFIG), [1.0, 0.999, 0.998], [_free("3", 1), _free("1", 0)])
    assert _op(command) == (SEED_OP_GERMINATE, "1")
    assert TamiyoConfig().default_blueprint == "" and command.seed_operation.blueprint_id == ""
    assert "plateau" in command.annotations["reason"]


def test_a_configured_blueprint_is_sent_with_germinate() -> None:
    tamiyo = HeuristicTamiyo(CONFIG.model_copy(update={"default_blueprint": "lowrank_adapter"}))
    command = _run(tamiyo, [1.0, 1.0, 1.0], [_free("1", 0)])
    assert command.seed_operation.blueprint_id == "lowrank_adapter"


def test_an_improving_loss_does_not_germinate() -> None:
    command = _run(HeuristicTamiyo(CONFIG), [1.0, 0.9, 0.8], [_free("1", 0)])
    assert is_noop(command)


def test_too_little_history_does_not_germinate() -> None:
    assert is_noop(_run(HeuristicTamiyo(CONFIG), [1.0, 1.0], [_free("1", 0)]))


def test_conservative_mode_never_germinates() -> None:
    command = _run(HeuristicTamiyo(CONFIG), [1.0, 1.0, 1.0], [_free("1", 0)], conservative=True)
    assert is_noop(command) and "conservative" in command.annotations["reason"]


def test_no_germination_without_a_free_slot_or_at_the_live_seed_limit() -> None:
    assert is_noop(_run(HeuristicTamiyo(CONFIG), [1.0, 1.0, 1.0], [_seed("seed1", SEED_STAGE_FOSSILIZED)]))
    busy = [_free("3", 1), _seed("seed1", SEED_STAGE_TRAINING)]
    assert is_noop(_run(HeuristicTamiyo(CONFIG), [1.0, 1.0, 1.0], busy))


def test_cooldown_spaces_germinations() -> None:
    tamiyo = HeuristicTamiyo(CONFIG)
    slots = [_free("1", 0)]
    assert _op(_run(tamiyo, [1.0, 1.0, 1.0], slots))[0] == SEED_OP_GERMINATE  # at epoch 2
    assert is_noop(tamiyo.evaluate_epoch(_packet(3, 1.0, slots)))
    assert is_noop(tamiyo.evaluate_epoch(_packet(4, 1.0, slots)))
    assert _op(tamiyo.evaluate_epoch(_packet(5, 1.0, slots)))[0] == SEED_OP_GERMINATE


@pytest.mark.parametrize(
    ("seed", "expected"),
    [
        (_seed("seed1", SEED_STAGE_GERMINATED), SEED_OP_START_TRAINING),
        (_seed("seed1", SEED_STAGE_TRAINING, epochs_in_stage=2), SEED_OP_START_GRAFTING),
        (_seed("seed1", SEED_STAGE_BLENDING, alpha=1.0), SEED_OP_STABILIZE),
        (_seed("seed1", SEED_STAGE_SHADOWING, epochs_in_stage=1, alpha=1.0), SEED_OP_FINE_TUNE),
        (_seed("seed1", SEED_STAGE_PROBATIONARY, epochs_in_stage=2, alpha=1.0, val_loss_delta=-0.02),
         SEED_OP_FOSSILIZE),
    ],
)
def test_live_seeds_advance_once_their_stage_condition_holds(seed: SeedState, expected: int) -> None:
    assert _op(_run(HeuristicTamiyo(CONFIG), [1.0], [seed])) == (expected, "seed1")


@pytest.mark.parametrize(
    "seed",
    [
        _seed("seed1", SEED_STAGE_TRAINING, epochs_in_stage=1),
        _seed("seed1", SEED_STAGE_BLENDING, alpha=0.7),
        _seed("seed1", SEED_STAGE_SHADOWING, epochs_in_stage=0, alpha=1.0),
        _seed("seed1", SEED_STAGE_PROBATIONARY, epochs_in_stage=1, alpha=1.0),
        _seed("seed1", SEED_STAGE_PROBATIONARY, epochs_in_stage=5, alpha=1.0, val_loss_delta=0.03),
    ],
)
def test_live_seeds_wait_while_their_stage_condition_does_not_hold(seed: SeedState) -> None:
    assert is_noop(_run(HeuristicTamiyo(CONFIG), [1.0], [seed]))


def test_a_harmful_applied_seed_is_culled_first_even_in_conservative_mode() -> None:
    seeds = [_seed("seed1", SEED_STAGE_GERMINATED, age=5), _seed("seed2", SEED_STAGE_SHADOWING, val_loss_delta=0.2)]
    command = _run(HeuristicTamiyo(CONFIG), [1.0], seeds, conservative=True)
    assert _op(command) == (SEED_OP_CULL, "seed2")
    assert "cull_tolerance" in command.annotations["reason"]


def test_harm_measured_before_blending_is_not_blamed_on_the_seed() -> None:
    command = _run(HeuristicTamiyo(CONFIG), [1.0], [_seed("seed1", SEED_STAGE_TRAINING, val_loss_delta=0.5)])
    assert is_noop(command)


def test_the_oldest_live_seed_is_advanced_first() -> None:
    seeds = [_seed("seed2", SEED_STAGE_GERMINATED, age=1), _seed("seed1", SEED_STAGE_GERMINATED, age=4)]
    assert _op(_run(HeuristicTamiyo(CONFIG), [1.0], seeds)) == (SEED_OP_START_TRAINING, "seed1")


def test_history_round_trips_through_state_dict_and_decisions_match() -> None:
    slots = [_free("1", 0)]
    a = HeuristicTamiyo(CONFIG)
    _run(a, [1.0, 1.0], slots)
    b = HeuristicTamiyo(CONFIG)
    b.load_state_dict(a.state_dict())
    ca, cb = (t.evaluate_epoch(_packet(2, 1.0, slots)) for t in (a, b))
    assert _op(ca) == _op(cb) == (SEED_OP_GERMINATE, "1")
    assert a.state_dict() == b.state_dict()
    assert a.state_dict()["phase_start_loss"] == 1.0
    HeuristicTamiyo().load_state_dict({})  # defaults work


def test_a_state_saved_before_phase_start_loss_existed_starts_the_phase_at_its_oldest_loss() -> None:
    tamiyo = HeuristicTamiyo(CONFIG)
    tamiyo.load_state_dict({"val_losses": [0.5, 0.4], "last_germination_epoch": None})
    assert tamiyo.state_dict()["phase_start_loss"] == 0.5


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="plateu_window"):
        TamiyoConfig(plateu_window=3)  # type: ignore[call-arg]
