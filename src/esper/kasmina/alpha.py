"""The alpha ramp used while a seed is BLENDING.

alpha(t) = (s(t/T) - s(0)) / (s(1) - s(0)), with s(x) = 1 / (1 + exp(-k (x - 1/2))),
T = blend_steps and k = steepness; then clamped to [0, 1]. So alpha(0) = 0 and alpha(T) = 1
exactly, alpha is smooth and monotone non-decreasing in t, and t outside [0, T] saturates.
"""

from __future__ import annotations

import math


def _sigmoid(x: float, steepness: float) -> float:
    return 1.0 / (1.0 + math.exp(-steepness * (x - 0.5)))


def alpha_at(step: int, blend_steps: int, steepness: float = 8.0) -> float:
    """Alpha after `step` steps of a `blend_steps`-step blending window."""
    if blend_steps < 1:
        raise ValueError(f"blend_steps must be >= 1, got {blend_steps}")
    if step <= 0:
        return 0.0
    if step >= blend_steps:
        return 1.0
    lo = _sigmoid(0.0, steepness)
    hi = _sigmoid(1.0, steepness)
    value = (_sigmoid(step / blend_steps, steepness) - lo) / (hi - lo)
    return min(1.0, max(0.0, value))
