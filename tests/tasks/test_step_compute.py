"""StepCompute on its own: micro-batches before the step's last accumulate without a read, and a
non-finite loss in any of them still skips the whole step (its gradients are never used)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from esper.kasmina import KasminaLayer
from esper.tolaria.control.aggregation import GradientAggregator
from esper.tolaria.loop.precision import Precision
from esper.tolaria.loop.step import StepCompute
from esper.tolaria.observe.profiling import Profiler
from esper.tolaria.tasks import ClassificationTask


def compute(model: nn.Module, aggregator: GradientAggregator) -> StepCompute:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return StepCompute(model=model, task=ClassificationTask(), kasmina=KasminaLayer(model, ["1"]),
                       aggregator=aggregator, precision=Precision("fp32", torch.device("cpu")), morphogenesis=True,
                       profiler=Profiler(False), optimizer=lambda: opt, accumulate=4)


def micro_batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def loss_poisoned_at(k: int) -> Any:
    calls = [0]

    def loss(out: Any, batch: Any) -> torch.Tensor:
        value = F.cross_entropy(out, batch[1])
        calls[0] += 1
        return value * float("nan") if calls[0] == k + 1 else value
    return loss


@pytest.mark.parametrize("check_grads", [False, True])
@pytest.mark.parametrize("poisoned", [0, 2])
def test_a_nan_in_an_earlier_micro_batch_skips_the_step(poisoned: int, check_grads: bool) -> None:
    model, agg = net(), GradientAggregator()
    params = dict(model.named_parameters())
    result = compute(model, agg).run(micro_batches(), params, loss_poisoned_at(poisoned), check_grads)
    assert not result.stats.finite and math.isnan(result.stats.total_loss)
    assert not result.stats.grad_overflow, "a NaN loss is an incident, not a loss-scale overflow"
    assert all(p.grad is None for p in model.parameters()), "no gradient of the poisoned step survives"
    assert agg.nonfinite_steps == 1


def test_accumulated_micro_batches_report_the_steps_sample_weighted_loss() -> None:
    model, batches = net(), micro_batches()
    result = compute(model, GradientAggregator()).run(batches, dict(model.named_parameters()),
                                                      ClassificationTask().loss, False)
    twin = net()
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    whole = F.cross_entropy(twin(x), y)
    whole.backward()
    assert result.stats.finite and result.rows == 32
    assert result.stats.total_loss == pytest.approx(whole.item(), rel=1e-6)
    assert float(result.host_loss) == pytest.approx(whole.item(), rel=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
