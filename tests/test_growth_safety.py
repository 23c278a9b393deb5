"""Growth safety: the pre-mutation veto (parameter and memory budgets, unpaid fossilization)."""

from __future__ import annotations

from typing import Any

import torch
from kasmina.helpers import drive_to, make_layer  # type: ignore[import-not-found]
from trainer_fixtures import MemoryBus, small_config  # type: ignore[import-not-found]

from esper.leyline import SEED_OP_FOSSILIZE, SEED_OP_GERMINATE, SEED_STAGE_PROBATIONARY, seed_command
from esper.tolaria.checkpoint.journal import CommandJournal
from esper.tolaria.config import GrowthConfig
from esper.tolaria.control.breakers import CircuitBreaker
from esper.tolaria.loop.apply import CommandApplier, structure_fingerprint
from esper.tolaria.loop.build import build_trainer
from esper.tolaria.observe.runlog import RunLog
from esper.tolaria.state.position import TrainerState


def _applier(kasmina: Any, growth: GrowthConfig, events: list[tuple[str, dict[str, Any]]]) -> CommandApplier:
    def sink(description: str, level: int = 0, priority: int = 0, **attributes: object) -> None:
        events.append((description, attributes))

    # The optimizer is never reached: every command here is refused before Kasmina sees it.
    return CommandApplier(kasmina, None, CircuitBreaker("kasmina"), CommandJournal(None, sink),  # type: ignore[arg-type]
                          RunLog(), sink, TrainerState(), growth)


def test_a_germination_past_the_parameter_budget_is_refused_before_anything_changes() -> None:
    layer = make_layer()
    events: list[tuple[str, dict[str, Any]]] = []
    cost = layer.germination_params("1")
    assert cost is not None
    applier = _applier(layer, GrowthConfig(max_params=layer.param_count() + cost - 1), events)
    before = structure_fingerprint(layer.model)
    applied, reason = applier.apply(seed_command(SEED_OP_GERMINATE, issued_by="t", target_seed_id="1"), epoch=3)
    assert not applied and reason.startswith("vetoed: GERMINATE in '1' would grow the model to ")
    assert "growth.max_params" in reason
    assert structure_fingerprint(layer.model) == before
    assert events == [("command_vetoed", {"command_id": events[0][1]["command_id"], "seed_id": "1",
                                          "reason": reason})]
    assert applier.log.apply_failures[0].error == reason and applier.log.apply_failures[0].model_unchanged
    fits = _applier(layer, GrowthConfig(max_params=layer.param_count() + cost), [])
    assert fits.veto(seed_command(SEED_OP_GERMINATE, issued_by="t", target_seed_id="1")) is None


def test_a_germination_past_the_memory_budget_is_refused() -> None:
    layer = make_layer()
    cost = layer.germination_params("1")
    assert cost is not None
    mib = (layer.param_count() + cost) * 4 * 4 / 2**20  # fp32; parameter, gradient, two moments
    command = seed_command(SEED_OP_GERMINATE, issued_by="t", target_seed_id="1")
    refused = _applier(layer, GrowthConfig(max_memory_mb=mib * 0.99), []).veto(command)
    assert refused is not None and "growth.max_memory_mb" in refused
    assert _applier(layer, GrowthConfig(max_memory_mb=mib * 1.01), []).veto(command) is None


def test_fossilizing_a_seed_the_model_is_better_without_is_refused() -> None:
    torch.manual_seed(0)
    layer = make_layer()
    seed_id = drive_to(layer, SEED_STAGE_PROBATIONARY)
    applier = _applier(layer, GrowthConfig(), [])
    command = seed_command(SEED_OP_FOSSILIZE, issued_by="t", target_seed_id=seed_id)
    applier.attribution = {seed_id: {"loss": -0.01, "score": 0.0}}
    applied, reason = applier.apply(command, epoch=5)
    assert not applied and reason.startswith(f"vetoed: FOSSILIZE {seed_id}: its attribution_loss is -0.01 < 0")
    assert layer.seed_record(seed_id).stage == SEED_STAGE_PROBATIONARY
    applier.attribution = {seed_id: {"loss": 0.02, "score": 0.0}}
    assert applier.veto(command) is None
    assert _applier(layer, GrowthConfig(veto_unpaid_fossilize=False), []).veto(command) is None


def test_a_run_under_a_tight_parameter_budget_never_grows_and_says_why() -> None:
    bus = MemoryBus()
    trainer = build_trainer(small_config(run={"epochs": 3}, growth={"max_params": 700}), bus=bus)
    host = trainer.param_count()
    result = trainer.fit()
    assert result.summary["param_count"] == host and not result.summary["seeds"]
    vetoes = [f["error"] for f in result.summary["apply_failures"]]
    assert vetoes and all(v.startswith("vetoed: GERMINATE") for v in vetoes)
    assert "command_vetoed" in bus.events()
    # The history (the console's and the report's line) says the germination did not happen.
    germinations = [e["command"] for e in result.summary["history"] if e["command"].startswith("germinate")]
    assert germinations and all("[not applied: vetoed: GERMINATE" in line for line in germinations)


def test_the_packet_tells_tamiyo_the_training_flops_spent() -> None:
    from esper.tamiyo import HeuristicTamiyo

    seen: list[float] = []
    inner = HeuristicTamiyo()

    class Recording:
        def evaluate_epoch(self, packet: Any) -> Any:
            seen.append(packet.training_metrics["flops_total"])
            return inner.evaluate_epoch(packet)

    build_trainer(small_config(run={"epochs": 3}), bus=MemoryBus(), tamiyo=Recording()).fit()
    assert seen[0] == 0.0 and 0 < seen[1] < seen[2]  # up to the previous boundary, growing
