"""Scale-out under `torchrun`: rank 0 talks to Tamiyo, every rank applies the same command.

Why not the `DistributedDataParallel` wrapper: a morphogenetic step runs extra forwards and
backwards (each seed's own loss on detached activations, PCGrad's split backward), and DDP's
reducer expects exactly one forward per backward on a fixed parameter set. Tolaria instead
averages gradients itself after its aggregator, with one flattened all-reduce per step over
whatever parameters exist *now* — so growth needs no re-wrapping at all: a germinated seed's
parameters join the bucket on the next step, a culled seed's leave it. Cost: one flatten and
one all-reduce of the trainable gradients per step (what DDP does, without bucketing overlap),
plus one 3-integer all-gather that agrees the step's health across ranks.

Every rank computes the same Kasmina structure from the same commands (seeds are initialised
from their seed id), and a digest of every parameter's and buffer's raw bits, computed on the
device, is compared at every boundary (`state_digest`).

Devices: the collectives' tensors live on `World.device`, `cuda:LOCAL_RANK` under NCCL (bound
with `torch.cuda.set_device` before the group is created, so `cuda` means this rank's GPU
everywhere), the CPU under gloo.

Faults: every collective runs under the group's timeout (`distributed.timeout_s`). A collective that
times out (a hung peer) or fails (a dead one) raises `PeerLost`: the group can never be used again,
so this rank leaves (`leave`) and rank 0's last committed checkpoint is where the job goes on from.
`World.sync` records when this rank last completed a collective: a rank told to stop that has not
been in step with its peers for a long while is the hung one (recovery/agreement.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

PEER_LOST_EXIT = 75  # EX_TEMPFAIL: the job failed for now; a restart resumes it from the last checkpoint


class PeerLost(RuntimeError):
    """A collective failed: a peer rank is dead, or hung past the group's timeout. The group cannot be
    used again, so this rank must leave (`leave`); nothing may catch this and carry on."""


@dataclass
class SyncClock:
    """When this rank last completed a collective with its peers (monotonic seconds), whether it is
    inside one now (`inside`), and whether one of its collectives has failed (`lost`: this rank is on
    its way out, flushing what it must)."""

    at: float = field(default_factory=time.monotonic)
    inside: bool = False
    lost: bool = False

    def since(self) -> float:
        return time.monotonic() - self.at

    def with_peers(self) -> bool:
        """Whether a long time out of step is its peers' doing, not a hang of this rank: it is waiting
        inside a collective (a signal's handler runs as the wait returns, before the sync is noted),
        or leaving after one failed."""
        return self.inside or self.lost


@dataclass(frozen=True)
class World:
    """This process's place in the job. `size == 1` means no collectives at all.

    `device` is where the collectives' tensors live: `cuda:LOCAL_RANK` under NCCL (which takes
    nothing else), the CPU under gloo and for one process."""

    rank: int = 0
    size: int = 1
    backend: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = 0.0  # every collective's limit; 0: torch's default (30 min gloo, 10 min NCCL)
    sync: SyncClock = field(default_factory=SyncClock, compare=False)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, device: str = "auto", timeout_s: float = 0.0) -> World:
        """Join the process group torchrun describes in the environment, if there is one.

        NCCL when the run trains on CUDA (`device` is `run.device`: `auto` means CUDA when torch
        sees it), gloo otherwise. Under NCCL each rank binds its own GPU (`LOCAL_RANK`) before the
        group exists: a rank that does not would run its collectives and every `cuda` tensor on GPU 0.
        `timeout_s` (`distributed.timeout_s`; 0: torch's default) bounds every collective."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        backend = "nccl" if on_cuda else "gloo"
        where = torch.device("cpu")
        limit: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        if backend == "nccl":
            where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(where)
            if not dist.is_initialized():
                dist.init_process_group(backend=backend, device_id=where, **limit, **_attempt_store(limit))
        elif not dist.is_initialized():
            dist.init_process_group(backend=backend, **limit, **_attempt_store(limit))
        return cls(rank=dist.get_rank(), size=dist.get_world_size(), backend=backend, device=where,
                   timeout_s=timeout_s)

    def with_timeout(self, timeout_s: float) -> World:
        """This world with every collective bounded by `timeout_s` (for a group that was created without
        it, e.g. by a caller that had not read the config yet); one process is returned unchanged."""
        if not self.distributed or timeout_s == self.timeout_s:
            return self
        from torch.distributed.distributed_c10d import _set_pg_timeout  # no public setter for a live group

        _set_pg_timeout(datetime.timedelta(seconds=timeout_s))
        return dataclasses.replace(self, timeout_s=timeout_s)

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Run one collective: a failure (timeout, closed connection) is `PeerLost`; success is a sync."""
        self.sync.inside = True
        try:
            yield
        except RuntimeError as exc:  # gloo and NCCL raise RuntimeError (DistBackendError) for both
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            limit = f" (limit {self.timeout_s:g} s)" if self.timeout_s else ""
            self.sync.lost = True
            raise PeerLost(f"{what} failed on rank {self.rank} of {self.size}{limit}: {first}") from exc
        else:
            self.sync.at = time.monotonic()
        finally:
            self.sync.inside = False  # after `at` (and `lost`): a handler never sees neither

    # ---------------------------------------------------------------- collectives
    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled; used for Leyline bytes and small records)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_leader else None]
        with self._collective("broadcast from rank 0"):
            dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (pickled; small records only)."""
        if not self.distributed:
            return [obj]
        found: list[Any] = [None] * self.size
        with self._collective("gather"):
            dist.all_gather_object(found, obj)  # NCCL: on the current device, which from_env bound
        return found

    def agree_step(self, finite: bool, incident_level: int, local_rows: int) -> tuple[bool, int, int]:
        """One small all-gather per step: all finite?, worst incident level, global rows (one read)."""
        if not self.distributed:
            return finite, incident_level, local_rows
        ranks = self.vote(0 if finite else 1, incident_level, local_rows)
        return (all(r[0] == 0 for r in ranks), max(r[1] for r in ranks), sum(r[2] for r in ranks))

    def vote(self, *values: int, prefix: torch.Tensor | None = None) -> list[list[int]]:
        """Every rank's `values` (small integers, the same count everywhere), in rank order: one
        all-gather and one read. `prefix` (int64 on `device`, e.g. a `state_digest`) travels in front
        of them in the same collective, so a decision and a digest cost one round trip."""
        parts = [prefix.to(self.device, torch.int64)] if prefix is not None else []
        row = torch.cat([*parts, self._ints(*values)]) if values else parts[0]
        if not self.distributed:
            return [row.tolist()]
        with self._collective("vote"):
            return self._all_gather(row).tolist()  # type: ignore[no-any-return]

    def agree_flag(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank."""
        return self.agree_any(flag)[0]

    def agree_any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag True on every rank if it is True on any rank: one all-reduce for all of them."""
        if not self.distributed:
            return flags
        t = self._ints(*(1 if f else 0 for f in flags))
        with self._collective("agreement"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def _ints(self, *values: int) -> torch.Tensor:
        """`values` as int64 on `device`, filled there: `torch.tensor(values, device="cuda")` would copy
        them from pageable memory and wait for the device, a second sync before the agreement's read."""
        return torch.stack([torch.full((), v, dtype=torch.int64, device=self.device) for v in values])

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (same shape on every rank) from every rank, stacked in rank order."""
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts)

    def reduce_gradients(self, params: Sequence[nn.Parameter], local_rows: int) -> None:
        """Make every rank's `.grad` the gradient of the global-batch mean loss, before anything reads it.

        Runs after the step's last backward and before the aggregator's norm, non-finite check and
        clipping, so those see the averaged gradient and two ranks clip as one process does. Each
        rank's gradient is of its own shard's mean loss: weighted by the shard's rows, summed, and
        divided by the summed rows (carried in the same buffer: no second collective), uneven last
        batches are exact too. Every rank reduces the same layout: a parameter whose `.grad` is None
        here is zero-filled, and a presence count per parameter rides along, so a parameter that
        no rank's batch reached keeps None everywhere (read only when this rank lacks one)."""
        live = [p for p in params if p.requires_grad]
        if not live:
            return
        missing = [i for i, p in enumerate(live) if p.grad is None]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in live]
        dtype = _buffer_dtype(grads)
        counts = torch.ones(len(live) + 1, dtype=dtype, device=grads[0].device)  # [rows, present per parameter]
        counts[0] = local_rows
        for i in missing:
            counts[1 + i] = 0
        flat = torch.cat([*(g.reshape(-1).to(dtype) for g in grads), counts])
        values = flat[:-counts.numel()]
        values.mul_(local_rows)
        with self._collective("gradient all-reduce"):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        rows = flat[-counts.numel()]
        present = flat[-len(live):][missing].tolist() if missing else []  # the one read, only when needed
        reached = {i for i, n in zip(missing, present, strict=True) if n > 0}
        offset = 0
        for i, (p, g) in enumerate(zip(live, grads, strict=True)):
            synced = values[offset:offset + g.numel()].view(g.shape)
            offset += g.numel()
            if p.grad is None and i not in reached:
                continue  # no rank computed it: it stays None, and the optimizer skips it
            if p.grad is None:
                p.grad = g
            torch.div(synced, rows, out=p.grad)

    def sync_buffers(self, model: nn.Module) -> None:
        """Every rank's buffers made the same before the model is evaluated or compared.

        Floating buffers (BatchNorm's running mean and variance) take the mean over ranks: each
        rank's running statistic is an exponential average of its own shards' batch statistics,
        linear in them, so the mean of the ranks' averages is the average of the ranks' mean batch
        statistics (syncing once per boundary equals syncing every step), which uses every rank's
        data where rank 0's copy would use half of it. Other buffers (BatchNorm's batch count, masks)
        are rank 0's: they are counters and flags, which a mean would turn into fractions. One
        collective per dtype; the sum is reduced in one place, so every rank gets the same bits."""
        if not self.distributed:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for buffer in model.buffers():
            by_dtype.setdefault(buffer.dtype, []).append(buffer)
        for dtype, buffers in sorted(by_dtype.items(), key=lambda item: str(item[0])):  # the same order everywhere
            floating = dtype.is_floating_point  # gloo reduces no bool and no bf16: the wire is fp32+ or int64
            wire = torch.promote_types(dtype, torch.float32) if floating else torch.int64
            flat = torch.cat([b.detach().reshape(-1).to(self.device, wire) for b in buffers])
            with self._collective("buffer sync"):
                if floating:
                    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                else:
                    dist.broadcast(flat, src=0)
            if floating:
                flat.div_(self.size)
            offset = 0
            with torch.no_grad():
                for b in buffers:
                    b.copy_(flat[offset:offset + b.numel()].view(b.shape))
                    offset += b.numel()

    def parameters_match(self, model: nn.Module) -> bool:
        """Whether every rank holds the same model: parameters and buffers, bit for bit (see
        `state_digest`), compared as one all-gather of four integers per rank."""
        if not self.distributed:
            return True
        return digests_match(self.vote(prefix=state_digest(model, self.device)))

    def barrier(self) -> None:
        if not self.distributed:
            return
        with self._collective("barrier"):
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])  # this rank's GPU, not a guessed one
            else:
                dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _attempt_store(limit: dict[str, Any]) -> dict[str, Any]:
    """Under torchrun, the group's rendezvous keys in a namespace of their own per restart attempt.

    Why: torchrun's workers share the agent's store across restarts, and the default group's keys
    (each rank's gloo address, NCCL's unique id) have the same names in every attempt. A restarted
    rank could read its peer's address from the attempt before and fail to connect ("connection
    refused"), or connect to nothing and hang (pytorch/pytorch#135712). Outside torchrun: the
    default `env://` rendezvous, unchanged."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return {}
    from torch.distributed.constants import default_pg_timeout
    from torch.distributed.rendezvous import _create_c10d_store  # the agent's store, or rank 0's

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    shared = _create_c10d_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, size,
                                limit.get("timeout", default_pg_timeout))
    return {"store": dist.PrefixStore(f"tolaria/attempt_{attempt}/", shared), "rank": rank, "world_size": size}


def digests_match(rows: Sequence[Sequence[int]], width: int = 4) -> bool:
    """Whether every rank's first `width` numbers (its `state_digest`) equal rank 0's."""
    return all(list(r[:width]) == list(rows[0][:width]) for r in rows)


def leave(message: str, code: int = PEER_LOST_EXIT) -> NoReturn:
    """Print `message` as one line and end this process now, without the interpreter's shutdown.

    Why `os._exit` and not `sys.exit`: after a peer is lost the process group is broken, and a
    normal exit waits on what cannot finish: `destroy_process_group` and gloo's teardown talk to the
    dead or hung peer, and threads blocked in a collective (or a hung drill's sleep) never return to
    be joined. What must survive is already on disk: the caller has flushed the async checkpoint
    writes (committed atomically, so a write cut short is never mistaken for a checkpoint), and the
    output streams are flushed here."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        os.write(2, (message.rstrip("\n") + "\n").encode())
    except OSError:
        pass
    os._exit(code)


def _buffer_dtype(grads: Sequence[torch.Tensor]) -> torch.dtype:
    """The all-reduce buffer's dtype: the gradients' own, fp32 for fp16/bf16 ones (a shard's rows
    times an fp16 gradient can pass fp16's largest value, 65504)."""
    dtype = grads[0].dtype
    for g in grads[1:]:
        dtype = torch.promote_types(dtype, g.dtype)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


_PRIME = 2**31 - 1  # keeps every product below 2**62: the digest's arithmetic never overflows int64
_WORDS = {1: torch.uint8, 2: torch.int16}  # wider elements are read as int32 words


def state_digest(model: nn.Module, device: torch.device | None = None) -> torch.Tensor:
    """Four int64s on `device` (default: the model's) that change when any parameter or buffer does.

    Each tensor's raw bits are read as integers (int32 words; int16/uint8 for narrower
    elements) and summed exactly in int64, on the tensor's own device: one reduction per tensor,
    no copy, no host read. The digest is [tensor count, elements weighted by position, the exact
    total of the sums, the sums combined by position modulo 2**31 - 1]. What it catches, for
    certain: a change of one word (any single bit flip, a NaN payload, -0.0 against 0.0, which
    float comparisons miss), a tensor that is missing, added, resized or moved to another
    position. Almost always (unless their sums agree modulo the prime): two tensors' contents
swapped. What it misses: elements permuted inside a
    tensor, and several changes whose integer differences cancel exactly in every sum, which
    diverging training does not produce.
    """
    tensors = [t.detach() for t in (*model.parameters(), *model.buffers())]
    where = device or (tensors[0].device if tensors else torch.device("cpu"))
    if not tensors:
        return torch.zeros(4, dtype=torch.int64, device=where)
    sums = torch.stack([_bit_sum(t).to(where) for t in tensors])
    weights = torch.arange(1, len(tensors) + 1, dtype=torch.int64, device=where)
    by_position = (sums.remainder(_PRIME) * weights).remainder(_PRIME).sum().remainder(_PRIME)
    shape = sum(t.numel() * k for k, t in enumerate(tensors, 1))  # host numbers: filled, not copied over
    return torch.stack([sums.new_full((), len(tensors)), sums.new_full((), shape), sums.sum(), by_position])


def _bit_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The int64 sum of `tensor`'s raw bits read as integers (exact: below 2**63 for any model
    under 2**32 words, 16 GiB)."""
    flat = tensor.contiguous().view(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    words = flat.view(_WORDS.get(flat.element_size(), torch.int32))
    return words.sum(dtype=torch.int64)
