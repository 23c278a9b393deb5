"""The built-in tasks: classification, regression, language modelling.

`SupervisedTask` holds the batch and output rules of `tasks.batch` and the loss: the model's own
`.loss` when it returns one (the Hugging Face convention, `use_model_loss`), else the task's
criterion on (prediction, target). Subclasses give the criterion and the validation sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from esper.tolaria.tasks.batch import BatchError, SplitBatch, model_loss, prediction, rows, split_batch

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SupervisedTask:
    """(inputs, target) batches of any structure; subclasses set `name`, the metrics and `criterion`."""

    name = "supervised"
    primary_metric = "loss"
    higher_is_better = False

    def __init__(self, *, loss_fn: Criterion | None = None, target_key: str | None = None,
                 use_model_loss: bool = True) -> None:
        self.loss_fn = loss_fn  # None: the task's own criterion
        self.target_key, self.use_model_loss = target_key, use_model_loss

    # ---------------------------------------------------------------- the step
    def split(self, batch: Any) -> SplitBatch:
        return split_batch(batch, None, self.target_key)

    def forward(self, model: nn.Module, batch: Any) -> Any:
        if _is_pair(batch):  # the common (inputs, target) batch, without building its SplitBatch each step
            return model(batch[0])
        s = split_batch(batch, model, self.target_key)  # the model's forward decides whether it gets the target
        return model(*s.args, **s.kwargs)

    def loss(self, output: Any, batch: Any) -> torch.Tensor:
        own = model_loss(output) if self.use_model_loss else None
        if own is not None:
            return own
        return self.compute_loss(*self.scored(output, batch))

    def scored(self, output: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target) that the criterion and the metrics compare."""
        if isinstance(output, torch.Tensor) and _is_pair(batch):
            return output, batch[1]
        target = self.split(batch).target
        if target is None:
            raise BatchError(f"the {self.name} task found no target in the batch and the model returned no `.loss`: "
                             "give (inputs, target) tuples, a dict with `labels`, or set task_options.target_key")
        return prediction(output), target

    def compute_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (self.loss_fn or self.criterion)(pred, target)

    def criterion(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch_size(self, batch: Any) -> int:
        if _is_pair(batch) and isinstance(batch[1], torch.Tensor) and batch[1].dim() > 0:
            return int(batch[1].shape[0])
        return rows(self.split(batch))

    # ---------------------------------------------------------------- validation
    def metric_sums(self, output: Any, batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        raise NotImplementedError


def _is_pair(batch: Any) -> bool:
    """An `(inputs, target)` tuple or list: what `split_batch` reads as `model(inputs)` and `target`."""
    return isinstance(batch, (tuple, list)) and len(batch) == 2


def _flat(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class scores `[N, C]` and targets `[N]`: `[B, T, C]` logits with `[B, T]` targets are flattened."""
    if pred.dim() == target.dim() + 1 and pred.dim() > 2:
        return pred.reshape(-1, pred.shape[-1]), target.reshape(-1)
    return pred, target


class ClassificationTask(SupervisedTask):
    """Cross-entropy on class scores; accuracy (primary). Targets equal to `ignore_index` do not count."""

    name, primary_metric, higher_is_better = "classification", "accuracy", True

    def __init__(self, *, loss_fn: Criterion | None = None, target_key: str | None = None,
                 use_model_loss: bool = True, label_smoothing: float = 0.0, ignore_index: int = -100) -> None:
        super().__init__(loss_fn=loss_fn, target_key=target_key, use_model_loss=use_model_loss)
        self.label_smoothing, self.ignore_index = label_smoothing, ignore_index

    def criterion(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = _flat(pred, target)
        return F.cross_entropy(pred, target, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)

    def metric_sums(self, output: Any, batch: Any) -> dict[str, torch.Tensor]:
        pred, target = _flat(prediction(output), self.split(batch).target)
        valid = target != self.ignore_index
        count = valid.sum()
        loss = self.loss(output, batch).float() * count  # mean loss x valid targets: a sum
        correct = ((pred.argmax(dim=-1) == target) & valid).sum()
        return {"loss_sum": loss, "correct": correct, "count": count}

    def metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        n = max(sums["count"], 1.0)
        return {"loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n}


class LanguageModelTask(ClassificationTask):
    """Next-token cross-entropy over `[B, T, V]` logits; perplexity, token accuracy (primary).

    A batch of token ids alone (a `[B, T]` tensor, or a dict without labels) is shifted: the model
    reads tokens `[:, :-1]` and predicts `[:, 1:]`. Given targets are used as they are, aligned with
    the logits, unless `shift_labels` (labels equal to the inputs, as Hugging Face causal LMs take
    them): then logits `[:, :-1]` are scored against labels `[:, 1:]`. The causal mask is the model's.
    """

    name, primary_metric = "language_model", "token_accuracy"

    def __init__(self, *, shift_labels: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self.shift_labels = shift_labels

    def forward(self, model: nn.Module, batch: Any) -> Any:
        return super().forward(model, _inputs_of(batch))

    def scored(self, output: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        pred, target = prediction(output), _targets_of(batch)
        if target is None:
            target = self.split(batch).target
        if target is None:
            raise BatchError("the language_model task found no targets: give token ids [B, T] (shifted for you), "
                             "(inputs, targets) pairs, or a dict with `labels`")
        if self.shift_labels:
            pred, target = pred[:, :-1], target[:, 1:]
        return pred, target

    def metric_sums(self, output: Any, batch: Any) -> dict[str, torch.Tensor]:
        pred, target = _flat(*self.scored(output, batch))
        valid = target != self.ignore_index
        count = valid.sum()
        loss = F.cross_entropy(pred.float(), target, ignore_index=self.ignore_index, reduction="sum")
        correct = ((pred.argmax(dim=-1) == target) & valid).sum()
        return {"loss_sum": loss, "correct": correct, "count": count}

    def metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        n = max(sums["count"], 1.0)
        loss = sums["loss_sum"] / n
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "token_accuracy": sums["correct"] / n}


def _inputs_of(batch: Any) -> Any:
    """A bare token batch's model inputs: every token but the last (other batches as they are)."""
    return batch[:, :-1] if isinstance(batch, torch.Tensor) else batch


def _targets_of(batch: Any) -> torch.Tensor | None:
    return batch[:, 1:] if isinstance(batch, torch.Tensor) else None


class RegressionTask(SupervisedTask):
    """Mean squared error; MSE and R² (primary: 1 − SSE / total sum of squares, over every target element)."""

    name, primary_metric, higher_is_better = "regression", "r2", True

    def criterion(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred.reshape(target.shape) if pred.numel() == target.numel() else pred, target)

    def metric_sums(self, output: Any, batch: Any) -> dict[str, torch.Tensor]:
        target = self.split(batch).target.float()
        pred = prediction(output).float().reshape(target.shape)
        return {"sse": (pred - target).square().sum(), "sum_y": target.sum(), "sum_y2": target.square().sum(),
                "count": torch.full((), float(target.numel()), device=target.device),  # no host-to-device copy
                "loss_sum": self.loss(output, batch).float() * target.numel()}

    def metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        n = max(sums["count"], 1.0)
        total = sums["sum_y2"] - sums["sum_y"] ** 2 / n
        r2 = 1.0 - sums["sse"] / total if total > 0 else 0.0
        return {"loss": sums["loss_sum"] / n, "mse": sums["sse"] / n, "r2": r2}


BUILTIN: dict[str, type[SupervisedTask]] = {
    "classification": ClassificationTask, "regression": RegressionTask, "language_model": LanguageModelTask}
