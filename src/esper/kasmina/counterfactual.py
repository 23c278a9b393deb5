"""Counterfactual forwards: the model's forward with chosen seeds switched off, many cases in one pass.

A plan is a tuple `off`: case `c` of the forward runs with seed `off[c]` switched off (its
contribution multiplied by 0), `None` meaning every seed on. With one case nothing is
replicated: the forward is simply the model with that seed off. With several, the first seeded
slot that holds a switched-off seed repeats its activation `h` case-major along the batch
dimension (case `c` is rows `c*B .. (c+1)*B`), so the host before that slot (and the seeds of
that slot up to the first switched-off one, included) runs once and every layer after it sees
`len(off) * B` rows; each seed's contribution is masked per case. The
caller splits the model's output back into the cases (see `esper.tolaria.loop.evaluate`).

Why one fused pass: attribution at every boundary must cost at most about one extra
validation pass, not one per seed; the replicated rows run through the same kernels at once.
The rule a model must follow for the fused form: every layer after the first seeded slot keeps
rows independent and batch-major (true of eval-mode layers; a model that mixes rows, or
returns a loss it computed itself, is evaluated one case per pass instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class CounterfactualError(RuntimeError):
    """A fused counterfactual forward met an activation whose rows do not match the replicated batch."""


class CounterfactualPlan:
    """The cases of one counterfactual forward and the row count of the batch being replicated."""

    def __init__(self, off: Sequence[str | None]) -> None:
        if not off:
            raise ValueError("a counterfactual plan needs at least one case")
        self.off = tuple(off)
        self.cases = len(self.off)
        self.rows: int | None = None  # the batch's rows, set by the first slot that replicates
        self._masks: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def begin_forward(self) -> None:
        """A new model forward: the next seeded slot replicates again."""
        self.rows = None

    def switches_off(self, seed_ids: Sequence[str]) -> bool:
        return any(s in self.off for s in seed_ids)

    def spread(self, slot: str, h: torch.Tensor, *, again: bool = False) -> torch.Tensor:
        """`h` with one copy per case (case-major); unchanged if one case or already replicated.
        `again`: a second tensor of the slot that is replicating now (the seed's output beside `h`)."""
        if self.cases == 1:
            return h
        if self.rows is None or (again and h.shape[0] == self.rows):
            self.rows = int(h.shape[0])
            return h.repeat((self.cases,) + (1,) * (h.dim() - 1))
        if h.shape[0] != self.cases * self.rows:
            raise CounterfactualError(
                f"slot {slot!r} sees {h.shape[0]} rows in a fused counterfactual forward of {self.cases} cases "
                f"x {self.rows} rows: the model mixes or reshapes rows after a seeded slot")
        return h

    def gate(self, seed_id: str, contribution: torch.Tensor) -> torch.Tensor:
        """`contribution` of `seed_id` with the cases that switch it off zeroed."""
        if seed_id not in self.off:
            return contribution
        if self.cases == 1:
            return torch.zeros_like(contribution)
        mask = self._mask(seed_id, contribution.device, contribution.dtype)
        shaped = contribution.reshape(self.cases, -1)
        return (shaped * mask).reshape(contribution.shape)

    def _mask(self, seed_id: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (seed_id, device, dtype)
        mask = self._masks.get(key)
        if mask is None:  # built once per plan, not per batch
            values = [0.0 if o == seed_id else 1.0 for o in self.off]
            mask = torch.tensor(values, dtype=dtype).reshape(self.cases, 1).to(device)
            self._masks[key] = mask
        return mask


def blend(plan: CounterfactualPlan, slot: str, chain: Sequence[tuple[str, Any, bool]], h: torch.Tensor) -> torch.Tensor:
    """A slot's blend (`chain`: seed id, seed module, blending?) with the plan's seeds switched off per case.

    Until a switched-off seed is met, every case sees the same `h`: seeds run on the batch's rows
    once, and the first switched-off seed's output is replicated with `h` (the cases differ only
    after it). A seed switched off in a one-case plan is not run at all."""
    for seed_id, seed, blending in chain:
        off = seed_id in plan.off
        if off and plan.cases == 1:
            continue
        delta = seed.alpha * seed(h) if blending else seed(h)
        if off and plan.rows is None:
            h, delta = plan.spread(slot, h), plan.spread(slot, delta, again=True)
        elif off:
            h = plan.spread(slot, h)
        h = h + plan.gate(seed_id, delta)
    return h
