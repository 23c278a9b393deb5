"""Registry of benchmark figures. Each area registers its figures in `figures_<area>.py`.

A figure function takes `quick: bool` and returns one measured value per trial
(a list of floats); the harness reports the median and spread and compares with the goal.
A figure's `device` ("cpu" or "cuda") says which `tolaria bench --device` measures it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

FigureFn = Callable[[bool], list[float]]


@dataclass(frozen=True)
class FigureSpec:
    name: str
    unit: str
    goal: float
    better: Literal["lower", "higher"]
    fn: FigureFn
    needs: str = ""  # "" or "redis": figures that need an Oona URL
    device: Literal["cpu", "cuda"] = "cpu"  # measured by `tolaria bench --device <device>` only

    def ok(self, value: float) -> bool:
        return value <= self.goal if self.better == "lower" else value >= self.goal


FIGURES: dict[str, FigureSpec] = {}


def figure(
    name: str, *, unit: str, goal: float, better: Literal["lower", "higher"] = "lower", needs: str = "",
    device: Literal["cpu", "cuda"] = "cpu",
) -> Callable[[FigureFn], FigureFn]:
    """Register `fn` as the measurement of figure `name`."""

    def register(fn: FigureFn) -> FigureFn:
        if name in FIGURES:
            raise ValueError(f"benchmark figure {name!r} registered twice")
        FIGURES[name] = FigureSpec(name=name, unit=unit, goal=goal, better=better, fn=fn, needs=needs,
                                   device=device)
        return fn

    return register
