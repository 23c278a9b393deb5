"""Host models for the bundled jobs: small MLPs whose named points Kasmina can grow at."""

from __future__ import annotations

import torch
from torch import nn


class HostMLP(nn.Module):
    """`stem` (identity on the input features), `body` of Linear/ReLU pairs, then `head`.

    Seed slots: `stem` (the input features), `body.1`, `body.3`, ... (the hidden activations).
    """

    def __init__(self, in_features: int, hidden: list[int], n_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.stem = nn.Identity()
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))
