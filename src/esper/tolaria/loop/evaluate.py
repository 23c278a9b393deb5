"""Validation through the task: its additive sums over the validation loader, read once at the end;
with seeds, each live seed's counterfactual attribution from the same pass.

Attribution: for every seed the forward applies, the validation loss and score with that seed
switched off, against the model as it is. The execution layer runs the cases fused into one
forward (`counterfactual(off)`: case 0 every seed on, case k seed k off; each layer after the
first seeded slot sees K+1 copies of the batch), the output is split back into the cases here,
and each case's sums are kept apart, so attribution costs the layers after the seeded slot K
more times in one pass, never a pass per seed. An output that cannot be split case by case (it
carries a loss the model computed over all rows, or the model mixes rows and the fused forward
fails) is evaluated one case per pass: the same numbers, K more passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from esper.tolaria.tasks import ClassificationTask, Task, score
from esper.tolaria.tasks.batch import model_loss, prediction


@runtime_checkable
class Attributable(Protocol):
    """An execution layer that can switch seeds off for a forward (`esper.kasmina.KasminaLayer`)."""

    def attributable_seeds(self) -> tuple[str, ...]: ...

    def counterfactual(self, off: Sequence[str | None]) -> AbstractContextManager[None]: ...

    def record_attribution(self, attribution: Mapping[str, Mapping[str, float]]) -> None: ...


def attributable(kasmina: object) -> Attributable | None:
    """The execution layer as an `Attributable`, if it is one (checked once per validation)."""
    return kasmina if isinstance(kasmina, Attributable) else None


@dataclass(frozen=True)
class Validation:
    """One validation pass: the mean loss, the score (primary metric, higher is better), every metric,
    and per applied seed its attribution: `loss` = val loss without the seed minus with it, `score` =
    score with it minus without (both positive when the seed helps)."""

    loss: float
    score: float
    metrics: dict[str, float] = field(default_factory=dict)
    attribution: dict[str, dict[str, float]] = field(default_factory=dict)
    chance_loss: float | None = None  # ln(classes) for a classifier (a uniform guess's loss), else None


class _Unsplittable(Exception):
    """A model output that cannot be split into the fused forward's cases."""


def evaluate(model: nn.Module, loader: Iterable[Any], task: Task, *, place: Callable[[Any], Any] | None = None,
             autocast: Callable[[], Any] | None = None, seeds: Attributable | None = None,
             fuse: bool = True) -> Validation:
    """The task's metrics over `loader`; `place` moves a batch to the model's device, `autocast` is the
    run's precision; with `seeds`, the attribution of each seed it applies (fused unless `fuse` is
    false). The model is left in training mode."""
    off = seeds.attributable_seeds() if seeds is not None else ()
    plan: tuple[str | None, ...] = (None, *off)
    widths: list[int] = []  # the prediction's last dimension, from the first batch
    model.eval()
    try:
        with torch.no_grad():
            cases = _fused_cases(model, loader, task, place, autocast, seeds, plan, widths) if off and fuse else None
            if cases is None:  # one pass per case; the first is the plain model
                cases = [_sums(model, loader, task, place, autocast, seeds if case else None, (case,), widths)[0]
                         for case in plan]
    finally:
        model.train()
    results = [_metrics(task, totals) for totals in _read(cases)]
    base = results[0]
    validation = Validation(base["loss"], score(task, base), base, {
        seed_id: {"loss": r["loss"] - base["loss"], "score": score(task, base) - score(task, r)}
        for seed_id, r in zip(off, results[1:], strict=True)}, _chance_loss(task, widths))
    if seeds is not None:
        seeds.record_attribution(validation.attribution)
    return validation


def _fused_cases(model: nn.Module, loader: Iterable[Any], task: Task, place: Callable[[Any], Any] | None,
                 autocast: Callable[[], Any] | None, seeds: Attributable | None,
                 plan: tuple[str | None, ...], widths: list[int]) -> list[dict[str, torch.Tensor]] | None:
    """Every case in one fused pass, or None where the model cannot be fused (see the module docstring)."""
    try:
        return _sums(model, loader, task, place, autocast, seeds, plan, widths)
    except (_Unsplittable, RuntimeError):  # RuntimeError: a layer refused K+1 times the rows
        return None


def _sums(model: nn.Module, loader: Iterable[Any], task: Task, place: Callable[[Any], Any] | None,
          autocast: Callable[[], Any] | None, seeds: Attributable | None,
          plan: tuple[str | None, ...], widths: list[int]) -> list[dict[str, torch.Tensor]]:
    """Per case, the task's sums over the loader, on the device (not read); `widths` gets the
    prediction's last dimension (a shape: no device read)."""
    cases: list[dict[str, torch.Tensor]] = [{} for _ in plan]
    switched = seeds.counterfactual(plan) if seeds is not None else nullcontext()
    with switched:
        for batch in loader:
            if place is not None:
                batch = place(batch)
            with autocast() if autocast is not None else nullcontext():
                output = task.forward(model, batch)
            parts = _split(output, len(plan)) if len(plan) > 1 else [output]
            if not widths and isinstance(task, ClassificationTask):
                widths.append(int(prediction(parts[0]).shape[-1]))
            for sums, part in zip(cases, parts, strict=True):
                for name, value in task.metric_sums(part, batch).items():
                    value = value.detach().double()
                    sums[name] = sums[name] + value if name in sums else value
    return cases


def _split(output: Any, cases: int) -> list[Any]:
    """The model output of a fused forward, one per case (rows are case-major)."""
    if model_loss(output) is not None:
        raise _Unsplittable("the model computed its loss over every case's rows")
    if isinstance(output, torch.Tensor):
        if output.dim() == 0 or output.shape[0] % cases:
            raise _Unsplittable(f"an output of shape {tuple(output.shape)} is not {cases} cases")
        return list(output.chunk(cases))
    if isinstance(output, (tuple, list)):
        columns = [_split(item, cases) for item in output]
        return [type(output)(column[c] for column in columns) if isinstance(output, tuple)
                else [column[c] for column in columns] for c in range(cases)]
    if isinstance(output, Mapping):
        split = {k: _split(v, cases) for k, v in output.items()}
        return [{k: v[c] for k, v in split.items()} for c in range(cases)]
    raise _Unsplittable(f"a {type(output).__name__} output")


def _read(cases: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
    """Every case's totals in one device read."""
    names = [list(sums) for sums in cases]
    flat = [sums[n].reshape(()) for sums, ns in zip(cases, names, strict=True) for n in ns]
    values = iter(torch.stack(flat).tolist() if flat else [])
    return [{n: next(values) for n in ns} for ns in names]


def _chance_loss(task: Task, widths: list[int]) -> float | None:
    """ln(classes) for a classification task (classes: the width of its prediction), else None."""
    if not isinstance(task, ClassificationTask) or not widths or widths[0] < 2:
        return None
    return math.log(widths[0])


def _metrics(task: Task, totals: dict[str, float]) -> dict[str, float]:
    metrics = task.metrics(totals) if totals else {"loss": float("nan"), task.primary_metric: float("nan")}
    return {k: float(v) for k, v in metrics.items()}
