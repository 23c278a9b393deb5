"""The step-overhead figures of `figures_steps`: registered with their goals, and each runs at a tiny size
(a few steps, one round) to one finite value without incidents."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from esper.tolaria.bench import figures_steps, registry

FIGURES = {"step_overhead_grown": 0.02, "step_overhead_lm": 0.03, "step_overhead_bf16": 0.03,
           "accumulate_overhead": 0.02}


def test_the_step_figures_are_registered_as_fractions_with_their_goals() -> None:
    for name, goal in FIGURES.items():
        spec = registry.FIGURES[name]
        assert (spec.unit, spec.goal, spec.better, spec.needs) == ("fraction", goal, "lower", "")


@pytest.mark.parametrize("measure", [figures_steps.measure_grown, figures_steps.measure_lm,
                                     figures_steps.measure_bf16, figures_steps.measure_accumulate],
                         ids=lambda fn: fn.__name__)
def test_each_figure_runs_at_a_tiny_size_to_one_finite_value(measure: Callable[[int, int], list[float]]) -> None:
    values = measure(3, 1)
    assert len(values) == 1 and math.isfinite(values[0]) and values[0] > -1.0


def test_the_grown_model_holds_one_probationary_and_one_fossilized_seed() -> None:
    import torch

    from esper.kasmina import KasminaConfig
    from esper.leyline import SEED_STAGE_FOSSILIZED, SEED_STAGE_PROBATIONARY

    kasmina = figures_steps._layer(figures_steps._mlp(), figures_steps.MLP_SLOTS,
                                   torch.zeros(2, figures_steps.MLP_FEATURES),
                                   KasminaConfig(min_training_steps=1, blend_steps=2, evaluation_steps=1))
    probationary, fossil = figures_steps.grow_two_seeds(kasmina)
    assert kasmina.seed_record(probationary).stage == SEED_STAGE_PROBATIONARY
    assert kasmina.seed_record(fossil).stage == SEED_STAGE_FOSSILIZED
    assert not any(p.requires_grad for n, p in kasmina.model.named_parameters() if f".{fossil}." in f".{n}")


def test_the_lm_figure_uses_the_text_lm_examples_sizes() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "text_lm.toml"
    if not example.exists():
        pytest.skip("examples/text_lm.toml is not in this checkout")
    config = tomllib.loads(example.read_text(encoding="utf-8"))
    assert config["model"]["kwargs"] == figures_steps.TEXT_LM_SIZES
    assert config["model"]["slots"] == figures_steps.TEXT_LM_SLOTS
    assert config["data"]["batch_size"] == figures_steps.TEXT_LM_BATCH
    assert config["data"]["kwargs"]["context"] == figures_steps.TEXT_LM_SIZES["context"]
