"""Validation: the loss and accuracy of the model over the validation loader."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def evaluate(model: nn.Module, loader: Iterable[Any],
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[float, float]:
    """(mean loss, accuracy) per target element: targets [B] for classifiers, [B, T] for sequence
    models. The model is left in training mode."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            count = y.numel()
            loss_sum += float(loss_fn(out, y)) * count
            correct += int((out.argmax(dim=-1) == y).sum())
            n += count
    model.train()
    return loss_sum / max(n, 1), correct / max(n, 1)
