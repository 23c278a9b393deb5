"""A toy growable model standing in for Kasmina: seeds are residual MLP blocks named
`kasmina_seeds.<id>`, inserted between an upstream `stem` and a shared downstream `head`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from esper.contracts import SeedLossTerm
from esper.leyline import SEED_STAGE_PROBATIONARY


class ToySeeded(nn.Module):
    def __init__(self, d_in: int = 8, d_hidden: int = 16, d_out: int = 4) -> None:
        super().__init__()
        self.d_hidden = d_hidden
        self.stem = nn.Linear(d_in, d_hidden)
        self.head = nn.Linear(d_hidden, d_out)
        self.kasmina_seeds = nn.ModuleDict()
        self.alphas: dict[str, float] = {}

    def add_seed(self, seed_id: str, alpha: float = 0.5) -> tuple[str, ...]:
        d = self.d_hidden
        block = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))
        self.kasmina_seeds[seed_id] = block
        self.alphas[seed_id] = alpha
        return self.seed_param_names(seed_id)

    def remove_seed(self, seed_id: str) -> tuple[str, ...]:
        names = self.seed_param_names(seed_id)
        del self.kasmina_seeds[seed_id]
        del self.alphas[seed_id]
        return names

    def seed_param_names(self, seed_id: str) -> tuple[str, ...]:
        return tuple(f"kasmina_seeds.{seed_id}.{n}" for n, _ in self.kasmina_seeds[seed_id].named_parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for seed_id, block in self.kasmina_seeds.items():
            h = h + self.alphas[seed_id] * block(h)
        return self.head(h)

    def seed_terms(self, x: torch.Tensor, y: torch.Tensor, stage: int = SEED_STAGE_PROBATIONARY) -> list[SeedLossTerm]:
        """Each seed at full strength on detached host activations; the head is shared."""
        h = torch.relu(self.stem(x)).detach()
        terms = []
        for seed_id, block in self.kasmina_seeds.items():
            loss = F.mse_loss(self.head(h + block(h)), y)
            terms.append(
                SeedLossTerm(
                    seed_id=seed_id,
                    stage=stage,
                    alpha=self.alphas[seed_id],
                    in_evaluation=False,
                    loss=loss,
                    batch_size=x.shape[0],
                    param_names=self.seed_param_names(seed_id),
                )
            )
        return terms


def batch(n: int = 32, d_in: int = 8, d_out: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, d_out, generator=g)
    return x, torch.sin(x @ w)
