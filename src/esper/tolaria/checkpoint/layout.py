"""Names on disk and the small codecs shared by the store (writer) and recovery (reader).

    <root>/wal-000001.log ...            write-ahead log segments (see WAL.md)
    <root>/ckpt-<step:012d>/model.pt     the snapshot's `model` section (torch.save bytes)
    <root>/ckpt-<step:012d>/state.pt     every other section
    <root>/ckpt-<step:012d>/manifest.pb  Leyline CheckpointManifest with per-file CRC32C and size
    <root>/ckpt-<step:012d>.t<txn>/      a step checkpointed again (after a rollback or a branch):
                                         a new name, so the committed one is never moved
    <root>/.ckpt-...tmp, .<file>.tmp     leftovers of interrupted writes: never read, cleaned

Every name read from disk (WAL COMMIT payloads, manifest file lists, directory entries) is
untrusted: it must match its pattern before it is joined to a path, and files are opened without
following links, without blocking (a FIFO), and only when regular and within a size limit.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import torch

from esper.tolaria.checkpoint.best import BestScore, score_from_dict

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.pb"
DATA_FILES = (MODEL_FILE, STATE_FILE)
CKPT_RE = re.compile(r"^ckpt-(\d{12})(?:\.t(\d{1,19}))?$")
# Manifest file names: one plain component (no separator, no leading dot, so never "..").
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
MAX_MANIFEST_BYTES = 1 << 20
MAX_DATA_FILE_BYTES = 1 << 40  # a sanity cap on what a manifest may declare (1 TiB per file)
_NDARRAY_KEY = "__esper_ndarray__"


class UnsafeFileError(ValueError):
    """A path in a run directory is not what the store writes there (a link, a FIFO, too big).
    `problem` is the short reason, for messages that name the file themselves."""

    def __init__(self, message: str, problem: str = "") -> None:
        super().__init__(message)
        self.problem = problem or message


def checkpoint_name(step: int, txn: int | None = None) -> str:
    """`ckpt-<step>`; with `txn`, the name a transaction uses when its step already has one."""
    return f"ckpt-{step:012d}" if txn is None else f"ckpt-{step:012d}.t{txn}"


def is_checkpoint_name(name: str) -> bool:
    return CKPT_RE.match(name) is not None


def step_of(name: str) -> int:
    match = CKPT_RE.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a checkpoint name (ckpt-<12 digits>[.t<txn>])")
    return int(match.group(1))


def open_regular(path: Path, limit: int) -> int:
    """An fd for reading `path`, refused (UnsafeFileError) unless it is a regular file of at most
    `limit` bytes. O_NOFOLLOW: a link is never followed; O_NONBLOCK: a FIFO cannot hang the open."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(f"{path} is a symbolic link; checkpoint files are regular files: "
                                  "remove it or restore the run directory from a trusted copy",
                                  "is a symbolic link, not a regular file") from exc
        raise
    info = os.fstat(fd)
    problem = ""
    if not stat.S_ISREG(info.st_mode):
        problem = f"is not a regular file (mode {stat.filemode(info.st_mode)})"
    elif info.st_size > limit:
        problem = f"is {info.st_size} bytes, over the {limit}-byte limit"
    if problem:
        os.close(fd)
        raise UnsafeFileError(f"{path} {problem}; the run directory holds something the store did not write: "
                              "remove it or restore the run directory from a trusted copy", problem)
    return fd


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of `path` under `open_regular`'s rules."""
    fd = open_regular(path, limit)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew after the check
        raise UnsafeFileError(f"{path} grew past the {limit}-byte limit while being read; is another process "
                              "writing this run directory?")
    return data


def is_real_dir(path: Path) -> bool:
    """A directory itself, not a link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def remove_path(path: Path) -> None:
    """Delete `path` inside its directory: a link is unlinked (its target never touched), a directory
    removed with its contents (rmtree does not follow links), a missing path ignored."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, onerror=_ignore_missing)
    else:
        path.unlink(missing_ok=True)


def _ignore_missing(func: Any, path: str, exc_info: Any) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


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
    best: BestScore | None = None  # the watched metric, when `checkpoint.keep_best` scored it


def encode_commit(info: CommitInfo) -> bytes:
    payload: dict[str, Any] = {"checkpoint": info.name, "manifest_sha256": info.manifest_sha256}
    if info.best is not None:
        payload["best"] = info.best.as_dict()
    return json.dumps(payload).encode()


def decode_commit(payload: bytes) -> CommitInfo | None:
    """None when the payload is not a commit description (a COMMIT written by a newer format).
    Raises UnsafeFileError when it names something that is not a checkpoint name: a WAL record
    is only CRC-protected, so a forged one could otherwise point a delete outside the run."""
    try:
        data = json.loads(payload)
        info = CommitInfo(str(data["checkpoint"]), str(data["manifest_sha256"]), score_from_dict(data.get("best")))
    except (ValueError, KeyError, TypeError):
        return None
    if not is_checkpoint_name(info.name):
        raise UnsafeFileError(f"WAL COMMIT names {info.name[:80]!r}, not a checkpoint name (ckpt-<12 digits>[.t<txn>])")
    return info


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
