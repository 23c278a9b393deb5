"""In-memory snapshots: the complete training state needed to continue bit-for-bit.

A snapshot's `state` is a nested dict of plain values and *cloned* tensors, taken at a
consistent point (between optimizer steps), so later training never mutates it. The snapshots
Tolaria keeps (the RAM cache, checkpoints) hold host tensors whatever device trains. Sections:

- `model`: model state_dict; `kasmina`: Kasmina manifest + state (structure first, then weights)
- `optimizer`, `lr`, `aggregator`, `breakers`, `conservative`, `tamiyo`, `monitors`
- `rng`: torch / numpy / python RNG states; `data`: data-loader position; `trainer`: epoch/step/history
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Snapshot:
    snapshot_id: str
    epoch: int
    global_step: int
    state: dict[str, Any]
    created_ns: int = field(default_factory=time.time_ns)
    healthy: bool = False
    nbytes: int = 0
    # A `RestorePlan` pairing the live tensors with this snapshot's, made when it was taken;
    # derived data, never saved (see restore_plan.py).
    restore_plan: Any = field(default=None, repr=False, compare=False)
    # A copy job (copy_engine.py) still filling this snapshot's tensors in the background; None
    # once known to be done. Read tensor *contents* only after `wait_ready`.
    ready: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.nbytes == 0:
            self.nbytes = tensor_bytes(self.state)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Return once every tensor holds its value, readable from this thread (a CUDA copy's event
        has completed); raise SnapshotCopyError if the copy failed."""
        job = self.ready
        if job is not None:
            job.synchronize(timeout)
            self.ready = None


class SnapshotCopyError(RuntimeError):
    """A snapshot's background copy failed or did not finish in time: the snapshot is unusable."""


def deep_clone(obj: Any) -> Any:
    """Copy containers and clone tensors so the result shares no storage with `obj`."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, Mapping):
        return {k: deep_clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [deep_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(deep_clone(v) for v in obj)
    return obj


# Values that hold no tensor: checked by exact type first, since the Mapping ABC check is slow and
# a snapshot is mostly plain values.
ATOMS = frozenset({int, float, str, bool, bytes, type(None)})


def tensor_bytes(obj: Any) -> int:
    """Bytes held by tensors anywhere inside `obj`."""
    if type(obj) in ATOMS:
        return 0
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    total = 0
    if isinstance(obj, (dict, Mapping)):
        for value in obj.values():
            total += tensor_bytes(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            total += tensor_bytes(value)
    return total


def state_checksum(obj: Any) -> str:
    """sha256 over every tensor's bytes and every plain value, in a deterministic order."""
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=str):
            digest.update(f"K{key!s}".encode())
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"L{len(obj)}".encode())
        for v in obj:
            _feed(digest, v)
    else:
        digest.update(f"V{obj!r}".encode())
