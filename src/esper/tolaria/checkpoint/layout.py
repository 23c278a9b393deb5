"""Names on disk and the small codecs shared by the store (writer) and recovery (reader).

    <root>/wal-000001.log ...            write-ahead log segments (see WAL.md)
    <root>/ckpt-<step:012d>/model.pt     the snapshot's `model` section (torch.save bytes)
    <root>/ckpt-<step:012d>/state.pt     every other section
    <root>/ckpt-<step:012d>/manifest.pb  Leyline CheckpointManifest with per-file CRC32C and size
    <root>/.ckpt-...tmp, .<file>.tmp     leftovers of interrupted writes: never read, cleaned
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import torch

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.pb"
DATA_FILES = (MODEL_FILE, STATE_FILE)
CKPT_RE = re.compile(r"^ckpt-(\d{12})$")
_NDARRAY_KEY = "__esper_ndarray__"


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:012d}"


def is_leftover(path: Path) -> bool:
    """A hidden temp file or directory from an interrupted write (atomic writes, staging dirs, trash)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def crc32c_of(data: bytes | memoryview) -> int:
    """CRC32C of a checkpoint file (hardware-accelerated where the CPU has it)."""
    return int(crc32c.crc32c(data))


@dataclass(frozen=True)
class CommitInfo:
    """What a COMMIT record's payload says about its checkpoint."""

    name: str
    manifest_sha256: str


def encode_commit(info: CommitInfo) -> bytes:
    return json.dumps({"checkpoint": info.name, "manifest_sha256": info.manifest_sha256}).encode()


def decode_commit(payload: bytes) -> CommitInfo | None:
    """None when the payload is not a commit description (a COMMIT written by a newer format)."""
    try:
        data = json.loads(payload)
        return CommitInfo(str(data["checkpoint"]), str(data["manifest_sha256"]))
    except (ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------- tensor-state bytes


_PLAIN = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointStateError(TypeError):
    """A snapshot holds an object that a `weights_only` load could not restore."""


def check_plain(obj: Any, where: str = "state") -> None:
    """Raise CheckpointStateError naming the first value that is not a tensor, numpy array,
    plain value or container of those (the trainer must convert it in its state_dict)."""
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic, *_PLAIN)):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            check_plain(key, f"{where} key {key!r}")
            check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, list | tuple | set | frozenset):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
        return
    raise CheckpointStateError(f"{where} is a {type(obj).__qualname__}; checkpoints hold tensors, numpy arrays and "
                               "plain values only: convert it to those in the component's state_dict()")


def dumps_state(obj: Any) -> bytes:
    """torch.save `obj` into memory. numpy arrays (the numpy RNG state) are carried as uint8 tensors
    so the bytes load with `weights_only=True`. Raises CheckpointStateError for other objects."""
    check_plain(obj)
    buf = io.BytesIO()
    torch.save(_encode(obj), buf)
    return buf.getvalue()


def loads_state(data: bytes) -> Any:
    """Inverse of `dumps_state`; only tensors and plain containers/values are accepted."""
    return _decode(torch.load(io.BytesIO(data), weights_only=True, map_location="cpu"))


def load_state_file(path: Path) -> Any:
    """`loads_state` of a file, memory-mapped: tensors share the page cache (copy-on-write)."""
    return _decode(torch.load(str(path), weights_only=True, map_location="cpu", mmap=True))


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic):
        arr = np.ascontiguousarray(obj)
        # frombuffer rejects an empty buffer, hence the one spare byte sliced off again.
        raw = torch.frombuffer(bytearray(arr.tobytes()) + b"\0", dtype=torch.uint8)[: arr.nbytes].clone()
        scalar = isinstance(obj, np.generic)
        return {_NDARRAY_KEY: raw, "dtype": arr.dtype.str, "shape": list(arr.shape), "scalar": scalar}
    if isinstance(obj, Mapping):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        return tuple(_encode(v) for v in obj)
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if _NDARRAY_KEY in obj:
            arr = np.frombuffer(obj[_NDARRAY_KEY].numpy().tobytes(), dtype=np.dtype(obj["dtype"]))
            arr = arr.reshape(obj["shape"]).copy()
            return arr[()] if obj["scalar"] else arr
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_decode(v) for v in obj)
    return obj
