"""A hand-written loop (no Tolaria trainer): HeuristicTamiyo drives KasminaLayer through a seed's whole life."""

from __future__ import annotations

import torch
from torch import nn

from esper.kasmina import KasminaConfig, KasminaLayer
from esper.leyline import (
    SEED_STAGE_BLENDING,
    SEED_STAGE_FOSSILIZED,
    SEED_STAGE_GERMINATED,
    SEED_STAGE_PROBATIONARY,
    SEED_STAGE_SHADOWING,
    SEED_STAGE_TRAINING,
    SeedOperation,
    is_noop,
    system_state_packet,
    validate_command,
)
from esper.tamiyo import HeuristicTamiyo, TamiyoConfig

# Simplified stage weights for this loop; Tolaria's aggregator owns the real table.
WEIGHTS = {SEED_STAGE_GERMINATED: 0.01, SEED_STAGE_TRAINING: 0.1, SEED_STAGE_SHADOWING: 0.5,
           SEED_STAGE_PROBATIONARY: 1.0}


def _data(generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 8, generator=generator)
    y = (x[:, 0] * x[:, 1] + torch.sin(x[:, 2] * 2) > 0).long()  # nonlinear: a seed can help
    return x, y


def _weight(stage: int, alpha: float, in_evaluation: bool) -> float:
    if in_evaluation:
        return 0.0
    return alpha if stage == SEED_STAGE_BLENDING else WEIGHTS.get(stage, 0.0)


def test_tamiyo_and_kasmina_grow_a_model_from_germination_to_fossilization() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x_train, y_train = _data(gen, 512)
    x_val, y_val = _data(gen, 256)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    kasmina = KasminaLayer(
        model, ["1", "3"], config=KasminaConfig(min_training_steps=8, blend_steps=8, seed_hidden=32),
        example_input=x_train[:2],
    )
    tamiyo = HeuristicTamiyo(
        TamiyoConfig(plateau_window=1, plateau_threshold=0.5, cooldown_epochs=100, min_training_epochs=1,
                     shadow_epochs=1, probation_epochs=1, fossilize_tolerance=0.05, cull_tolerance=0.5)
    )
    params_before = kasmina.param_count()
    loss_fn = nn.functional.cross_entropy
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    applied: list[str] = []
    step = 0
    for epoch in range(14):
        model.train()
        for start in range(0, 512, 64):
            xb, yb = x_train[start:start + 64], y_train[start:start + 64]
            loss = loss_fn(model(xb), yb)
            for term in kasmina.seed_loss_terms(xb, yb, loss_fn):
                loss = loss + _weight(term.stage, term.alpha, term.in_evaluation) * term.loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            kasmina.on_step()
            step += 1
        model.eval()
        with torch.no_grad():
            val_loss = loss_fn(model(x_val), y_val).item()
        kasmina.on_epoch_end(epoch, val_loss, 0.0)
        packet = system_state_packet(
            epoch=epoch, global_step=step, training_loss=loss.item(), validation_loss=val_loss,
            validation_accuracy=0.0, seed_states=kasmina.export_seed_states(),
        )
        command = tamiyo.evaluate_epoch(packet)
        validate_command(command)
        if is_noop(command):
            continue
        result = kasmina.apply_command(command)
        assert result.ok, result.reason
        applied.append(SeedOperation.Name(command.seed_operation.operation))
        if result.structure_changed:  # a real trainer keeps optimizer state; this loop just rebuilds
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    stages = [state.stage for state in kasmina.export_seed_states()]
    assert SEED_STAGE_FOSSILIZED in stages, applied
    assert kasmina.param_count() > params_before
    assert applied[:6] == ["SEED_OP_GERMINATE", "SEED_OP_START_TRAINING", "SEED_OP_START_GRAFTING",
                           "SEED_OP_STABILIZE", "SEED_OP_FINE_TUNE", "SEED_OP_FOSSILIZE"]
    history = kasmina.seeds_summary()[0]["history"]
    assert [h["stage"] for h in history][-1] == "SEED_STAGE_FOSSILIZED"
