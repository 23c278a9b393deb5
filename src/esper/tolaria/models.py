"""Host models for the bundled jobs: small MLPs whose named points Kasmina can grow at."""

from __future__ import annotations

import torch
from torch import nn


class HostMLP(nn.Module):
    """`stem` (identity on the input features), `body` of Linear/ReLU pairs (each followed by a
    Dropout when `dropout > 0`), then `head`.

    Seed slots: `stem` (the input features) and every ReLU of `body` (the hidden activations):
    `body.1`, `body.3`, ... without dropout, `body.1`, `body.4`, ... with it. A seed's output joins
    the activation before the dropout, so dropout regularises host and seeds alike.
    """

    def __init__(self, in_features: int, hidden: list[int], n_classes: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:  # no module at 0: parameter and slot names stay those of the plain MLP
                layers.append(nn.Dropout(dropout))
            width = h
        self.stem = nn.Identity()
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))
