"""Scale-out under `torchrun`: rank 0 talks to Tamiyo, every rank applies the same command.

Why not the `DistributedDataParallel` wrapper: a morphogenetic step runs extra forwards and
backwards (each seed's own loss on detached activations, PCGrad's split backward), and DDP's
reducer expects exactly one forward per backward on a fixed parameter set. Tolaria instead
averages gradients itself after its aggregator, with one flattened all-reduce per step over
whatever parameters exist *now* — so growth needs no re-wrapping at all: a germinated seed's
parameters join the bucket on the next step, a culled seed's leave it. Cost: one flatten and
one all-reduce of the trainable gradients per step (what DDP does, without bucketing overlap),
plus one 3-element all-reduce that agrees the step's health across ranks.

Every rank computes the same Kasmina structure from the same commands (seeds are initialised
from their seed id), and a cheap parameter checksum is compared at every boundary.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    """This process's place in the job. `size == 1` means no collectives at all."""

    rank: int = 0
    size: int = 1
    backend: str = ""

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls) -> World:
        """Join the process group torchrun describes in the environment, if there is one."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return cls(rank=dist.get_rank(), size=dist.get_world_size(), backend=backend)

    # ---------------------------------------------------------------- collectives
    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled; used for Leyline bytes and small records)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_leader else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree_step(self, finite: bool, incident_level: int, local_rows: int) -> tuple[bool, int, int]:
        """One small all-reduce per step: all finite?, worst incident level, global rows."""
        if not self.distributed:
            return finite, incident_level, local_rows
        t = torch.tensor([0 if finite else 1, incident_level, local_rows], dtype=torch.int64)
        flags = t[:2].clone()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        rows = t[2:].clone()
        dist.all_reduce(rows, op=dist.ReduceOp.SUM)
        return flags[0].item() == 0, int(flags[1].item()), int(rows.item())

    def agree_flag(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def average_gradients(self, params: Iterable[nn.Parameter], local_rows: int, global_rows: int) -> None:
        """Make every rank's `.grad` the gradient of the global-batch mean loss.

        Each rank's gradient is of its own shard's mean loss; weighting by the shard's share of the
        global batch before summing makes uneven last batches exact as well.
        """
        if not self.distributed:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        flat.mul_(local_rows / global_rows)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(synced)

    def parameters_match(self, model: nn.Module) -> bool:
        """Cheap cross-rank check that every rank holds the same model (sums in float64)."""
        if not self.distributed:
            return True
        with torch.no_grad():
            params = list(model.parameters())
            local = torch.stack([torch.stack([p.double().sum(), p.double().abs().sum()]) for p in params]).sum(0) \
                if params else torch.zeros(2, dtype=torch.float64)
            local = torch.cat([local, torch.tensor([float(len(params))], dtype=torch.float64)])
        gathered = [torch.zeros_like(local) for _ in range(self.size)]
        dist.all_gather(gathered, local)
        return all(torch.equal(gathered[0], g) for g in gathered[1:])

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
