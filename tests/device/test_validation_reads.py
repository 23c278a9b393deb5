"""Validation never waits for the device per batch: each task's sums stay where the model runs and
are read once, after the last batch. A torch-function mode counts every host read of a tensor
(`item`, `tolist`, `float(t)`, ...); on a GPU the loop runs under CUDA's sync debug mode."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from esper.tolaria.loop.evaluate import evaluate
from esper.tolaria.tasks import ClassificationTask, LanguageModelTask, RegressionTask, Task

HOST_READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu", "__array__"}


class HostReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's value to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(11, 8), nn.Linear(8, 11)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def classification(n: int) -> tuple[nn.Module, list[Any], Task]:
    return nn.Linear(4, 3), [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(n)], ClassificationTask()


def regression(n: int) -> tuple[nn.Module, list[Any], Task]:
    return nn.Linear(4, 1), [(torch.randn(5, 4), torch.randn(5)) for _ in range(n)], RegressionTask()


def language_model(n: int) -> tuple[nn.Module, list[Any], Task]:
    return TinyLM(), [torch.randint(0, 11, (3, 9)) for _ in range(n)], LanguageModelTask()


CASES = {"classification": classification, "regression": regression, "language_model": language_model}


def reads(case: Callable[[int], tuple[nn.Module, list[Any], Task]], batches: int) -> int:
    torch.manual_seed(0)
    model, loader, task = case(batches)
    with HostReads() as counter:
        evaluate(model, loader, task)
    return counter.count


@pytest.mark.parametrize("name", sorted(CASES))
def test_validation_reads_the_host_once_however_many_batches(name: str) -> None:
    assert reads(CASES[name], 2) == reads(CASES[name], 7) == 1


def test_the_counter_sees_a_task_that_reads_every_batch() -> None:
    class Chatty(ClassificationTask):
        def metric_sums(self, output: Any, batch: Any) -> dict[str, torch.Tensor]:
            sums = super().metric_sums(output, batch)
            float(sums["loss_sum"])  # a host read per batch: what validation must not do
            return sums

    def chatty(n: int) -> tuple[nn.Module, list[Any], Task]:
        model, loader, _ = classification(n)
        return model, loader, Chatty()

    assert reads(chatty, 7) - reads(chatty, 2) == 5


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_on_cuda_the_validation_loop_never_synchronises(name: str) -> None:
    torch.manual_seed(0)
    model, loader, task = CASES[name](6)
    model.cuda()
    on_gpu = [tuple(t.cuda() for t in b) if isinstance(b, tuple) else b.cuda() for b in loader]
    torch.cuda.synchronize()

    def watched() -> Iterator[Any]:
        torch.cuda.set_sync_debug_mode("error")  # from the first batch ...
        try:
            yield from on_gpu
        finally:
            torch.cuda.set_sync_debug_mode("default")  # ... to the end of the loop, before the one read

    result = evaluate(model, watched(), task)
    expected = evaluate(model.cpu(), loader, task)
    assert result.loss == pytest.approx(expected.loss, rel=1e-4)
