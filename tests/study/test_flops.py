"""Compute accounting: FLOPs counted once per structure, equal to the analytic count, summed into the history."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytest
import torch
from torch import nn
from trainer_fixtures import FAST_GROWTH, MemoryBus, small_config  # type: ignore[import-not-found]

from esper.kasmina import KasminaLayer
from esper.leyline import SEED_OP_GERMINATE, seed_command
from esper.tolaria.loop.build import build_trainer
from esper.tolaria.loop.flops import TrainingFlops, count_step_flops
from esper.tolaria.tasks import ClassificationTask

IN, HIDDEN, OUT, ROWS = 12, 7, 5, 16


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(ROWS, IN), torch.randint(0, OUT, (ROWS,))


def analytic_step(rows: int, widths: list[int]) -> int:
    """A Linear stack's forward (2·rows·in·out each) and backward: every weight gradient, and the input
    gradient of every layer but the first (the data needs none)."""
    layers = list(zip(widths, widths[1:], strict=False))
    forward = sum(2 * rows * a * b for a, b in layers)
    backward = sum(2 * rows * a * b for a, b in layers) + sum(2 * rows * a * b for a, b in layers[1:])
    return forward + backward


def test_a_linear_stack_counts_its_analytic_flops() -> None:
    flops = count_step_flops(mlp(), ClassificationTask(), batch())
    assert flops == analytic_step(ROWS, [IN, HIDDEN, OUT]) == 4 * ROWS * IN * HIDDEN + 6 * ROWS * HIDDEN * OUT


def test_counting_leaves_the_rng_the_gradients_and_the_modes_as_they_were() -> None:
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Dropout(0.5), nn.Linear(HIDDEN, OUT))
    model.train()
    data = batch()
    rng = torch.get_rng_state()
    count_step_flops(model, ClassificationTask(), data)
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout mask drawn from the run's stream
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())


def test_frozen_parameters_cost_no_weight_gradient() -> None:
    model = mlp()
    model[2].requires_grad_(False)  # a fossilized part: only its input gradient is still needed
    flops = count_step_flops(model, ClassificationTask(), batch())
    assert flops == analytic_step(ROWS, [IN, HIDDEN, OUT]) - 2 * ROWS * HIDDEN * OUT


class Batches:
    """A validation loader that counts how often an iterator was made."""

    def __init__(self) -> None:
        self.data, self.iterations = batch(), 0

    def __iter__(self) -> Any:
        self.iterations += 1
        return iter([self.data])


def test_a_structure_is_counted_once_and_again_after_a_germination() -> None:
    model = mlp()
    kasmina = KasminaLayer(model, ["1"], example_input=torch.zeros(2, IN))
    batches = Batches()
    flops = TrainingFlops(model=model, kasmina=kasmina, task=ClassificationTask(), batches=batches, place=None,
                          rows_per_step=64, morphogenesis=True, autocast=nullcontext)
    flops.observe()
    host = flops.per_step
    assert host == analytic_step(64, [IN, HIDDEN, OUT])
    flops.observe()
    assert flops.counts == 1 and batches.iterations == 1  # the same structure: not counted again
    result = kasmina.apply_command(seed_command(SEED_OP_GERMINATE, issued_by="test", target_seed_id="1"))
    assert result.ok, result.reason
    flops.observe()
    assert flops.counts == 2 and flops.per_step > host  # the seed's own-loss pass is a step's work too
    assert batches.iterations == 1  # the representative batch is drawn once


class FailsUnderTheCounter(nn.Module):
    """A model one of whose operators the counter cannot run (raised only while a count is on)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.utils._python_dispatch._get_current_dispatch_mode() is not None:
            raise RuntimeError("custom kernel has no meta implementation")
        return self.linear(x)


@pytest.mark.parametrize(("model", "batches", "why"), [
    (mlp, lambda: [], "the validation loader yields no batch"),
    (FailsUnderTheCounter, lambda: [batch()], "FlopCounterMode failed on this model: custom kernel"),
])
def test_a_structure_that_cannot_be_counted_costs_zero_and_the_summary_says_why(
        model: Any, batches: Any, why: str, caplog: pytest.LogCaptureFixture) -> None:
    host = model()
    kasmina = KasminaLayer(host, [next(n for n, _ in host.named_modules() if n)], example_input=torch.zeros(2, IN))
    flops = TrainingFlops(model=host, kasmina=kasmina, task=ClassificationTask(), batches=batches(), place=None,
                          rows_per_step=64, morphogenesis=True, autocast=nullcontext)
    flops.observe()
    flops.observe()
    summary = flops.summary(None)
    assert summary["per_step"] == 0 and summary["not_counted"].startswith(why)
    assert sum("training FLOPs are not counted" in r.message for r in caplog.records) == 1  # said once


def test_the_history_sums_each_epochs_steps_times_the_structures_count() -> None:
    config = small_config(run={"epochs": 3, "morphogenesis": False})
    trainer = build_trainer(config, bus=MemoryBus())
    summary = trainer.fit().summary
    per_step = analytic_step(64, [64, 8, 10])  # digits: 64 features, hidden [8], 10 classes; batch 64
    assert summary["flops"]["per_step"] == per_step
    history = summary["history"]
    assert [h["flops"] for h in history] == [per_step * h["global_step"] for h in history]
    assert summary["flops"]["total"] == history[-1]["flops"] > 0


def test_a_grown_run_counts_more_per_step_after_the_seed_arrives() -> None:
    config = small_config(run={"epochs": 5}, **FAST_GROWTH)
    trainer = build_trainer(config, bus=MemoryBus())
    summary = trainer.fit().summary
    history = summary["history"]
    steps = [b["global_step"] - a["global_step"] for a, b in zip([{"global_step": 0, "flops": 0.0}, *history],
                                                                  history, strict=False)]
    rates = [(b["flops"] - a["flops"]) / n for a, b, n in zip([{"flops": 0.0}, *history], history, steps,
                                                              strict=False)]
    assert summary["seeds"], "the fast-growth config germinates a seed"
    assert rates[0] == pytest.approx(analytic_step(64, [64, 8, 10]))
    assert max(rates) > rates[0]
    assert summary["flops"]["total"] == history[-1]["flops"]
    assert any(h["attribution"] for h in history)  # the record's other fields keep their values beside flops


def test_counting_changes_nothing_about_the_run() -> None:
    """Dropout draws from the run's RNG and a seed grows: the counts must not move the final state."""
    hashes = []
    for count in (True, False):
        config = small_config(run={"epochs": 4}, model={"hidden": [8], "dropout": 0.2}, **FAST_GROWTH)
        trainer = build_trainer(config, bus=MemoryBus())
        if not count:
            trainer.flops.observe = lambda: None
        summary = trainer.fit().summary
        assert summary["seeds"]
        hashes.append(summary["final_state_sha256"])
    assert hashes[0] == hashes[1]
