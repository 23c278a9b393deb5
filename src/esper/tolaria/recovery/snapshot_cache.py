"""Bounded in-memory cache of `Snapshot`s for fast rollback, and the in-place restore helper.

Contracts:

- Snapshots live in host memory, whatever device the model trains on: a CUDA tensor's copy goes
  into a pinned host buffer, filled by the copy engine on a side stream (copy_engine.py).
  `snapshot_gpu_bytes` reports what the cache holds on any CUDA device: 0.
- The cache is an LRU bounded by *count* (`capacity`) and *bytes* (`max_bytes`, tensor bytes as
  `Snapshot.nbytes` reports them). Both caps hold after every `put`. Without an explicit
  `max_bytes` the cap follows host memory (host_memory.py): 2 GiB, raised to two snapshots where
  host RAM holds them. A snapshot larger than `max_bytes` on its own is refused: not inserted,
  counted in `refused_total`, reported as an event and logged. Every eviction is counted
  (`evictions_total`) and reported as an event.
- A snapshot becomes a rollback target only once `mark_healthy` says the window after it trained
  cleanly (a snapshot of a failing step must never be what a rollback restores). `last_healthy`
  returns the newest healthy snapshot; eviction spares that one while any other candidate exists,
  so a burst of fresh (unproven) snapshots cannot push out the only good rollback target.
- The in-place restore (`restore_tensors_`, `copy_in_place_`, `confirm_restored`) lives in
  tensor_restore.py and is re-exported here.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from esper.tolaria.recovery.copy_engine import CopyJob, StreamCopier, fits_host_buffer, host_buffer_like
from esper.tolaria.recovery.host_memory import BASE_CAP_BYTES, available_host_bytes, cap_for
from esper.tolaria.recovery.snapshot_copier import BackgroundCopier
from esper.tolaria.recovery.tensor_restore import (  # the restore half, re-exported for its users
    Pairs,
    RestoreError,
    RestoreResult,
    confirm_restored,
    copy_in_place_,
    flatten_tensors,
    restore_tensors_,
    sample_bits,
    samples_equal,
)
from esper.tolaria.state.snapshot import ATOMS, Snapshot, SnapshotCopyError, tensor_bytes

__all__ = ["DEFAULT_MAX_BYTES", "CacheEvent", "DeferRule", "RestoreError", "RestoreResult", "SnapshotCache",
           "confirm_restored", "copy_behind_rule", "copy_in_place_", "flatten_tensors", "restore_tensors_",
           "sample_bits", "samples_equal"]

# defer(section, tensor): True to copy this tensor behind (see snapshot_copier.py). `section` is the
# top-level key of the state it sits under ("model", "optimizer", ...).
DeferRule = Callable[[str, torch.Tensor], bool]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = BASE_CAP_BYTES  # the cap's floor when it follows host memory
MAX_EVENTS = 256


@dataclass(frozen=True)
class CacheEvent:
    kind: Literal["evicted", "refused"]
    snapshot_id: str
    global_step: int
    nbytes: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SnapshotCache:
    """LRU of in-memory snapshots bounded by count and bytes (see module docstring)."""

    def __init__(self, capacity: int = 5, max_bytes: int | None = None, *, recycle: bool = False,
                 available: Callable[[], int] = available_host_bytes) -> None:
        """`max_bytes` None: the cap follows host memory (`available` reads it; see host_memory.py)."""
        if capacity < 1:
            raise ValueError(f"SnapshotCache capacity={capacity}: keep at least 1 snapshot")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"SnapshotCache max_bytes={max_bytes}: give a positive byte budget")
        self.capacity = capacity
        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        self._available = available if max_bytes is None else None
        self._items: OrderedDict[str, Snapshot] = OrderedDict()  # least recently used first
        self.bytes_used = 0
        self.evictions_total = 0
        self.refused_total = 0
        self.events: deque[CacheEvent] = deque(maxlen=MAX_EVENTS)
        self.recycle = recycle
        self.recycled_total = 0
        self._spare: Snapshot | None = None  # the last evicted snapshot, kept for `take` to reuse
        self._copier: BackgroundCopier | None = None  # the copy engine of CPU tensors
        self._streams: StreamCopier | None = None  # the copy engine of CUDA tensors
        self._filling: Snapshot | None = None  # the snapshot whose copy job may be running, until settled

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, snapshot_id: object) -> bool:
        return snapshot_id in self._items

    def put(self, snapshot: Snapshot) -> bool:
        """Insert `snapshot` as most recently used; False (and an event) if it alone exceeds max_bytes."""
        self._fit_cap(snapshot.nbytes)
        if snapshot.nbytes > self.max_bytes:
            self._refuse(snapshot.snapshot_id, snapshot.global_step, snapshot.nbytes)
            return False
        self._drop(snapshot.snapshot_id)
        self._items[snapshot.snapshot_id] = snapshot
        self.bytes_used += snapshot.nbytes
        self._enforce_caps(keep=snapshot.snapshot_id)
        return True

    def get(self, snapshot_id: str) -> Snapshot | None:
        """The snapshot, marked most recently used; None if absent."""
        snap = self._items.get(snapshot_id)
        if snap is not None:
            self._items.move_to_end(snapshot_id)
        return snap

    def peek(self, snapshot_id: str) -> Snapshot | None:
        """The snapshot without touching LRU order; None if absent."""
        return self._items.get(snapshot_id)

    def mark_healthy(self, snapshot_id: str) -> bool:
        """Declare the window after `snapshot_id` clean, making it a rollback target; False if absent."""
        snap = self._items.get(snapshot_id)
        if snap is None:
            return False
        snap.healthy = True
        return True

    def last_healthy(self, before_step: int | None = None) -> Snapshot | None:
        """The newest healthy snapshot (by global step), taken strictly before `before_step` if given.

        Does not change LRU order."""
        best: Snapshot | None = None
        for snap in self._items.values():
            if not snap.healthy or (before_step is not None and snap.global_step >= before_step):
                continue
            if best is None or (snap.global_step, snap.created_ns) > (best.global_step, best.created_ns):
                best = snap
        return best

    def ids(self) -> list[str]:
        """Snapshot ids from least to most recently used."""
        return list(self._items)

    def take(self, snapshot_id: str, epoch: int, global_step: int, state: Mapping[str, Any], *,
             defer: DeferRule | None = None) -> Snapshot | None:
        """Copy `state` into a new host-memory snapshot and `put` it; None (and a refusal event) if
        too big.

        With `recycle=True`, tensors are copied into the buffers of the last evicted snapshot where
        path, shape, dtype and host placement match, instead of freshly allocated (a 20M-param model
        with Adam state: ~95 ms instead of ~245 ms on a 2-core CPU). The spare is reused only if
        nothing outside the cache still references it, its state or any container or tensor inside
        it (an async checkpoint writer holding it keeps it intact), and only once its own copy job
        is done. The spare adds one snapshot of memory beyond `max_bytes`.

        With `defer`, the CPU tensors it selects are copied behind, on the cache's background
        thread; CUDA tensors are always copied by the stream engine, those `defer` selects behind
        the next forward pass. The snapshot's `ready` job runs until `settle()`, which the caller
        must reach before anything writes those live tensors."""
        self.settle()  # its buffers may be the spare now, and jobs never overlap
        nbytes = tensor_bytes(state)
        self._fit_cap(nbytes)
        if nbytes > self.max_bytes:
            self._refuse(snapshot_id, global_step, nbytes)
            return None
        snapshot = self._copy(snapshot_id, epoch, global_step, state, nbytes, self._take_spare(), defer)
        self.put(snapshot)
        return snapshot

    def copy_out(self, snapshot_id: str, epoch: int, global_step: int, state: Mapping[str, Any], *,
                 defer: DeferRule | None = None) -> Snapshot:
        """A snapshot of `state` in host memory, kept outside the cache (one over the cap, the stop
        checkpoint): fresh buffers, the same copy engines, settled like `take`'s."""
        self.settle()
        return self._copy(snapshot_id, epoch, global_step, state, tensor_bytes(state), None, defer)

    def _copy(self, snapshot_id: str, epoch: int, global_step: int, state: Mapping[str, Any], nbytes: int,
              spare: Any, defer: DeferRule | None) -> Snapshot:
        todo = _Copies([], [], [])
        with torch.no_grad():
            cloned = _clone_into(state, spare, defer, todo)
        snapshot = Snapshot(snapshot_id=snapshot_id, epoch=epoch, global_step=global_step, state=cloned, nbytes=nbytes)
        job = self._submit(todo)
        if job is not None:
            snapshot.ready = job
            self._filling = snapshot
        return snapshot

    def _submit(self, todo: _Copies) -> CopyJob | None:
        """Hand what `_clone_into` left to the engine of the model's device (None: nothing left)."""
        if todo.device_now or todo.device_behind:
            return self._submit_device(todo)
        if todo.behind:
            if self._copier is None:
                self._copier = BackgroundCopier()
            return self._copier.submit([d for d, _ in todo.behind], [s for _, s in todo.behind])
        return None

    def _submit_device(self, todo: _Copies) -> CopyJob:
        """A CUDA model's copies: the device tensors to the stream engine, its CPU-held ones at once."""
        device = todo.device_now + todo.device_behind
        if todo.behind:  # a CUDA model's few CPU-held tensors (e.g. Adam's step counts): at once
            copy_in_place_([d for d, _ in todo.behind], [s for _, s in todo.behind])
        if self._streams is None:
            self._streams = StreamCopier()
        return self._streams.submit([d for d, _ in device], [s for _, s in device], at_once=len(todo.device_now))

    def settle(self, timeout: float | None = None) -> None:
        """Order the training thread's next work after the last snapshot's copy job: on the CPU,
        wait until it is done; on CUDA, make the current stream wait on its event (readers of its
        host buffers call `Snapshot.wait_ready`). If it failed, that snapshot is dropped from the
        cache and SnapshotCopyError is raised."""
        snapshot, self._filling = self._filling, None
        job = snapshot.ready if snapshot is not None else None
        if snapshot is None or job is None:
            return
        try:
            job.wait(timeout)
        except SnapshotCopyError:
            if self._items.get(snapshot.snapshot_id) is snapshot:
                self._drop(snapshot.snapshot_id)
            raise
        if job.done():
            snapshot.ready = None

    @property
    def filling(self) -> bool:
        """A copy-behind job was handed out and not yet settled."""
        return self._filling is not None

    def close(self) -> None:
        """Finish any copy-behind job and stop the copier thread."""
        try:
            self.settle()
        finally:
            if self._copier is not None:
                self._copier.close()
            if self._streams is not None:
                self._streams.close()

    @property
    def snapshot_gpu_bytes(self) -> int:
        """Bytes of snapshot storage the cache holds on any CUDA device (cached snapshots, the spare,
        the one being filled). Snapshots live in host memory, so this is 0."""
        held = [*self._items.values(), self._spare, self._filling]
        return sum(t.numel() * t.element_size() for snap in held if snap is not None
                   for t in flatten_tensors(snap.state).values() if t.is_cuda)

    def _fit_cap(self, nbytes: int) -> None:
        """Raise a memory-following cap to hold two snapshots of `nbytes` where host RAM allows."""
        if self._available is None or 2 * nbytes <= self.max_bytes:
            return
        held = self.bytes_used + (self._spare.nbytes if self._spare is not None else 0)
        self.max_bytes = cap_for(nbytes, self.max_bytes, self._available() + held)

    def _take_spare(self) -> Any:
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        try:
            spare.wait_ready()  # a buffer goes to a new job only once its last job is done
        except SnapshotCopyError:
            return None
        state = spare.state
        del spare
        # References now: `state` here, getrefcount's argument; anything more is an outside holder.
        if sys.getrefcount(state) > 2 or not _unshared_children(state):
            return None
        self.recycled_total += 1
        return state

    def clear(self) -> None:
        self.settle()
        self._spare = None
        self._items.clear()
        self.bytes_used = 0

    def stats(self) -> dict[str, Any]:
        """Counts for the run summary and telemetry."""
        return {
            "count": len(self._items),
            "capacity": self.capacity,
            "bytes_used": self.bytes_used,
            "max_bytes": self.max_bytes,
            "healthy": sum(1 for s in self._items.values() if s.healthy),
            "evictions_total": self.evictions_total,
            "refused_total": self.refused_total,
            "copied_behind": {"jobs": sum(e.jobs_total for e in (self._copier, self._streams) if e),
                              "bytes": sum(e.bytes_total for e in (self._copier, self._streams) if e)},
            "snapshot_gpu_bytes": self.snapshot_gpu_bytes,
            "events": [e.as_dict() for e in self.events],
        }

    def _refuse(self, snapshot_id: str, global_step: int, nbytes: int) -> None:
        reason = (
            f"snapshot {snapshot_id} holds {nbytes} bytes, over the cache's max_bytes="
            f"{self.max_bytes}: raise snapshots.max_mb or rely on checkpoints for this model"
        )
        self.refused_total += 1
        self.events.append(CacheEvent("refused", snapshot_id, global_step, nbytes, reason))
        log.warning(reason)

    def _drop(self, snapshot_id: str) -> Snapshot | None:
        snap = self._items.pop(snapshot_id, None)
        if snap is not None:
            self.bytes_used -= snap.nbytes
        return snap

    def _enforce_caps(self, keep: str) -> None:
        while len(self._items) > self.capacity or self.bytes_used > self.max_bytes:
            victim = self._pick_victim(keep)
            snap = self._drop(victim)
            if snap is None:
                return
            self.evictions_total += 1
            why = "count" if len(self._items) + 1 > self.capacity else "bytes"
            reason = f"evicted least recently used snapshot over the {why} cap"
            self.events.append(CacheEvent("evicted", snap.snapshot_id, snap.global_step, snap.nbytes, reason))
            if self.recycle:
                self._spare = snap

    def _pick_victim(self, keep: str) -> str:
        pinned = self.last_healthy()
        candidates = [sid for sid in self._items if sid != keep]
        spare = [sid for sid in candidates if pinned is None or sid != pinned.snapshot_id]
        return (spare or candidates)[0]


def _unshared_children(container: Any) -> bool:
    """True if every container and tensor below `container` is referenced only by its parent."""
    children = container.values() if isinstance(container, dict) else container
    for child in children:
        # References: the parent, the loop variable `child`, getrefcount's argument.
        if isinstance(child, (torch.Tensor, dict, list)) and sys.getrefcount(child) > 3:
            return False
        if isinstance(child, (dict, list)) and not _unshared_children(child):
            return False
    return True


def _fits(old: Any, t: torch.Tensor) -> bool:
    """`old` can receive a copy of CPU tensor `t` as is (a recycled buffer)."""
    return isinstance(old, torch.Tensor) and old.dtype == t.dtype and old.shape == t.shape and old.device == t.device


@dataclass
class _Copies:
    """What `_clone_into` left for a copy engine: CPU tensors `defer` selected (`behind`), and every
    CUDA tensor, those the next forward pass may change first (`device_now`)."""
    behind: Pairs
    device_now: Pairs
    device_behind: Pairs


def _clone_into(obj: Any, old: Any, defer: DeferRule | None, todo: _Copies, section: str | None = None) -> Any:
    """deep_clone(obj) into host memory, copying into `old`'s matching tensors instead of allocating
    where possible.

    A CPU tensor that `defer(section, tensor)` selects, and every CUDA tensor, gets its destination
    only; the (destination, source) pair goes to `todo` for a copy engine."""
    if type(obj) in ATOMS:
        return obj
    if isinstance(obj, torch.Tensor):
        if not obj.is_cpu:
            return _host_copy(obj, old, defer, todo, section)
        if defer is not None and defer(section or "", obj):
            dst = old if _fits(old, obj) else torch.empty_like(obj, requires_grad=False)
            todo.behind.append((dst, obj))  # the copier copies under no_grad: no detach needed
            return dst
        src = obj.detach()
        return old.copy_(src) if _fits(old, src) else src.clone()
    if isinstance(obj, (dict, Mapping)):  # dict first: the common case skips the slow ABC check
        olds = old if isinstance(old, dict) else {}
        return {k: _clone_into(v, olds.get(k), defer, todo, str(k) if section is None else section)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        seq = old if isinstance(old, list) and len(old) == len(obj) else [None] * len(obj)
        items = [_clone_into(v, o, defer, todo, section or "") for v, o in zip(obj, seq, strict=True)]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def _host_copy(t: torch.Tensor, old: Any, defer: DeferRule | None, todo: _Copies, section: str | None) -> torch.Tensor:
    """The host buffer receiving device tensor `t`: queued for the stream engine when `t` is on CUDA;
    copied at once from a device without streams."""
    dst = old if fits_host_buffer(old, t) else host_buffer_like(t)
    if not t.is_cuda:
        return dst.copy_(t)
    behind = defer is not None and defer(section or "", t)
    (todo.device_behind if behind else todo.device_now).append((dst, t))
    return dst


def copy_behind_rule(model: torch.nn.Module) -> DeferRule:
    """The copy-behind `defer` rule for a trainer's state: parameters and optimizer state (only the
    optimizer writes them); buffers, such as BatchNorm's, change in the forward pass and are
    cloned at once."""
    params = {p.data_ptr() for p in model.parameters()}
    return lambda section, x: section == "optimizer" or (section == "model" and x.data_ptr() in params)
