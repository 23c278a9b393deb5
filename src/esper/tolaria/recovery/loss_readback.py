"""Step losses read back one step late, so a step never waits for the device (`run.loss_readback`).

A synchronous read (`float(loss)`) makes the host wait until the GPU has finished the step, which
empties the GPU's queue once per step. A deferred step instead queues its loss: on CUDA a
non-blocking copy into a pinned host slot, with an event recorded after it. The loss of step t is
read at step t + 1, after step t + 1's work is queued, when the GPU has (nearly always) finished
step t already; the wait, if any, is for an event, not for the whole device.

The lag is exactly one step on every device (on the CPU the value is there at once and is simply
held back one step), so the step at which a late incident is handled does not depend on timing:
a resumed or repeated run takes the same path.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PendingLoss:
    """One deferred step: where it was in the run, and its loss on its way to the host."""

    epoch: int
    step: int
    batches: tuple[int, ...]
    host: torch.Tensor  # one element; on CUDA a pinned buffer the copy fills
    done: Any = None  # the CUDA event recorded after the copy; None: the value is already there


class LossReadback:
    """A queue of deferred step losses; `arrived` returns those older than the newest, `drain` all."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pending: deque[PendingLoss] = deque()
        self._free: list[torch.Tensor] = []  # pinned slots whose value has been read

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, loss: torch.Tensor, *, epoch: int, step: int, batches: tuple[int, ...]) -> None:
        value = loss.detach().reshape(1)
        if not self.cuda:
            self._pending.append(PendingLoss(epoch, step, batches, value))
            return
        host = self._free.pop() if self._free else torch.empty(1, dtype=value.dtype, pin_memory=True)
        host.copy_(value, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append(PendingLoss(epoch, step, batches, host, event))

    def arrived(self) -> list[tuple[PendingLoss, float]]:
        """Every queued loss but the newest: the steps before the one just submitted."""
        return [self._read(self._pending.popleft()) for _ in range(len(self._pending) - 1)]

    def drain(self) -> list[tuple[PendingLoss, float]]:
        """Every queued loss (before a window closes, a boundary, a checkpoint of the live state)."""
        return [self._read(self._pending.popleft()) for _ in range(len(self._pending))]

    def clear(self) -> None:
        """Forget queued losses: a rollback discarded the steps they belong to."""
        while self._pending:
            pending = self._pending.popleft()
            if pending.done is not None:
                pending.done.synchronize()  # the copy may still write the slot: reuse it only once done
                self._free.append(pending.host)

    def _read(self, pending: PendingLoss) -> tuple[PendingLoss, float]:
        if pending.done is not None:
            pending.done.synchronize()
        value = float(pending.host[0])
        if pending.done is not None:
            self._free.append(pending.host)
        return pending, value


def defers_reads(mode: str, device: torch.device, world_size: int) -> bool:
    """Whether unchecked steps defer their loss read (`run.loss_readback`). `auto` defers on CUDA in
    one process. Several processes read at once: the ranks agree on every step's health in a
    collective that needs it (see distributed.py)."""
    if mode == "auto":
        return device.type == "cuda" and world_size == 1
    if mode == "deferred" and world_size > 1:
        raise ValueError("run.loss_readback = 'deferred' needs one process: ranks agree on each step's loss "
                         "as it is taken; use 'auto' or 'sync' under torchrun")
    return mode == "deferred"
