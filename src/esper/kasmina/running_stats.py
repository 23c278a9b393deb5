"""Keep the own-loss passes from moving the host's running statistics (BatchNorm and the like).

A train-mode forward of a module with `track_running_stats` updates its running mean, variance
and batch count in place. The own-loss pass is an extra train-mode forward per live seed, so
without care the host's statistics would move two or more times per step, and on a batch whose
activations downstream of the slot the main forward never produced. Inside `scratch_running_stats`
those buffers are swapped for copies: the pass normalises with batch statistics exactly as the
main forward does, its updates land in the copies, and the originals (the very tensor objects,
so nothing holding them goes stale) come back unchanged. Cost: one clone per such buffer per step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn


def running_stat_modules(model: nn.Module) -> list[nn.Module]:
    """Modules of `model` whose train-mode forward updates buffers (`track_running_stats=True`)."""
    return [m for m in model.modules() if getattr(m, "track_running_stats", False)]


@contextmanager
def scratch_running_stats(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Inside, train-mode forwards of `modules` update copies of their buffers; the originals return after."""
    saved = []
    for module in modules:
        if not module.training:  # eval mode reads the statistics and never writes them
            continue
        for name, buffer in list(module.named_buffers(recurse=False)):
            saved.append((module, name, buffer))
            setattr(module, name, buffer.clone())
    try:
        yield
    finally:
        for module, name, buffer in saved:
            setattr(module, name, buffer)
