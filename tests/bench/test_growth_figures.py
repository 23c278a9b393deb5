"""The attribution cost figure: registered with the issue's goal, measuring a seed that matters."""

from __future__ import annotations

from torch.utils.data import DataLoader

from esper.tolaria.bench.figures_growth import _grown_cnn
from esper.tolaria.bench.harness import discover
from esper.tolaria.bench.registry import FIGURES
from esper.tolaria.loop.evaluate import evaluate
from esper.tolaria.tasks import ClassificationTask
from esper.tolaria.zoo import digits_images


def test_the_attribution_cost_figure_is_registered_with_its_goal() -> None:
    discover()
    spec = FIGURES["attribution_cost_ratio"]
    assert (spec.goal, spec.better, spec.device) == (1.0, "lower", "cpu")


def test_the_benchmarked_seed_is_applied_and_changes_validation() -> None:
    layer = _grown_cnn("conv1.2")
    (seed_id,) = layer.attributable_seeds()
    _, val = digits_images()
    result = evaluate(layer.model, list(DataLoader(val, batch_size=64)), ClassificationTask(), seeds=layer)
    assert result.attribution[seed_id]["loss"] != 0.0  # the seed is on the path the figure times
