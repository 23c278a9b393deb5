"""In-memory snapshots: the complete training state needed to continue bit-for-bit.

A snapshot's `state` is a nested dict of plain values and *cloned* tensors, taken at a
consistent point (between optimizer steps), so later training never mutates it. Sections:

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

    def __post_init__(self) -> None:
        if self.nbytes == 0:
            self.nbytes = tensor_bytes(self.state)


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


def tensor_bytes(obj: Any) -> int:
    """Bytes held by tensors anywhere inside `obj`."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


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
