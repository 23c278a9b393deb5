"""Append-only write-ahead log of checkpoint transactions and journaled commands.

Byte format: see WAL.md beside this file. In short, each record is a 44-byte little-endian
header (magic, version, type, txn id, epoch, step, payload length, CRC32 of header+payload,
CRC32 of the header's first 40 bytes) followed by the payload. Segments are `wal-000001.log`,
`wal-000002.log`, ... in a directory.

Replay rules (the contract recovery relies on):
- a short header or short payload at the end of a segment, or an all-zero tail, is a *torn
  tail*: the end of that segment. The writer truncates it when it opens the log.
- a bad magic, unknown version/type or CRC mismatch anywhere else is *corruption*: reported
  as a `WalCorruption` with segment and offset; replay of that segment stops there (records
  after it cannot be framed reliably) and continues with the next segment. A writer that
  opens a log whose last segment is corrupt starts a new segment, keeping the evidence.
"""

from __future__ import annotations

import enum
import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from esper.tolaria.checkpoint.atomic import fsync_dir, write_all
from esper.tolaria.checkpoint.layout import UnsafeFileError, read_regular

MAGIC = b"EWAL"
VERSION = 1
HEADER = struct.Struct("<4sHHQQQII")  # magic, version, type, txn, epoch, step, payload_len, record crc32
HEADER_CRC = struct.Struct("<I")  # crc32 of the 40 bytes above, so a damaged length is never read as a torn tail
HEADER_SIZE = HEADER.size + HEADER_CRC.size  # 44
MAX_PAYLOAD = 64 * 1024 * 1024
MAX_WAL_BYTES = 256 * 1024 * 1024  # the largest `max_bytes` a writer accepts
MAX_SEGMENT_BYTES = MAX_WAL_BYTES + HEADER_SIZE + MAX_PAYLOAD  # replay refuses to read a bigger segment
SEGMENT_RE = re.compile(r"^wal-(\d{6})\.log$")


class RecordType(enum.IntEnum):
    """WAL record types; the numbers are part of the on-disk format."""

    BEGIN = 1
    COMMIT = 2
    ABORT = 3
    COMMAND = 4  # payload: a serialized Leyline AdaptationCommand
    REWIND = 5  # training went back to `step` (a rollback or a branch); payload: UTF-8 reason


@dataclass(frozen=True)
class WalRecord:
    type: RecordType
    txn_id: int
    epoch: int
    step: int
    payload: bytes
    segment: str = ""
    offset: int = 0


@dataclass(frozen=True)
class WalCorruption:
    """A record that fails its checks in the middle of a segment."""

    segment: str
    offset: int
    reason: str

    def __str__(self) -> str:
        return f"{self.segment} corrupt record at offset {self.offset}: {self.reason}"


@dataclass(frozen=True)
class TornTail:
    segment: str
    offset: int
    trailing_bytes: int

    def __str__(self) -> str:
        return (f"{self.segment} torn tail at offset {self.offset} ({self.trailing_bytes} bytes) "
                "treated as end of log")


@dataclass
class ReplayResult:
    records: list[WalRecord] = field(default_factory=list)
    corruptions: list[WalCorruption] = field(default_factory=list)
    torn: list[TornTail] = field(default_factory=list)

    @property
    def events(self) -> list[str]:
        return [str(c) for c in self.corruptions] + [str(t) for t in self.torn]


class WalCorruptionError(RuntimeError):
    """Raised by `replay(strict=True)` on the first corrupt record."""

    def __init__(self, corruption: WalCorruption) -> None:
        super().__init__(f"{corruption}; the WAL cannot be trusted past this point: restore from the previous "
                         "checkpoint or inspect the segment with `tolaria inspect`")
        self.corruption = corruption


def encode_record(rtype: RecordType, txn_id: int, epoch: int, step: int, payload: bytes = b"") -> bytes:
    """Frame one record: header with CRC32 over (header with crc=0) + payload, then payload."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"WAL payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}; journal a reference instead")
    head = HEADER.pack(MAGIC, VERSION, int(rtype), txn_id, epoch, step, len(payload), 0)
    crc = zlib.crc32(payload, zlib.crc32(head))
    body = HEADER.pack(MAGIC, VERSION, int(rtype), txn_id, epoch, step, len(payload), crc)
    return body + HEADER_CRC.pack(zlib.crc32(body)) + payload


def segment_paths(directory: Path) -> list[Path]:
    """WAL segments in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if SEGMENT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(SEGMENT_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def segment_name(index: int) -> str:
    return f"wal-{index:06d}.log"


def scan_segment(data: bytes, name: str) -> tuple[list[WalRecord], WalCorruption | None, TornTail | None]:
    """Parse one segment's bytes; see the module docstring for torn-tail vs corruption."""
    records: list[WalRecord] = []
    pos = 0
    while pos < len(data):
        rest = len(data) - pos
        if rest < HEADER_SIZE:
            return records, None, TornTail(name, pos, rest)
        magic, version, rtype, txn, epoch, step, length, crc = HEADER.unpack_from(data, pos)
        (header_crc,) = HEADER_CRC.unpack_from(data, pos + HEADER.size)
        problem = _header_problem(magic, version, rtype, length)
        if not problem and zlib.crc32(data[pos:pos + HEADER.size]) != header_crc:
            problem = "header CRC32 mismatch"
        if problem:
            # A preallocated-but-unwritten tail reads as zeros after a power loss: still a torn tail.
            if data.count(0, pos) == rest:
                return records, None, TornTail(name, pos, rest)
            return records, WalCorruption(name, pos, problem), None
        end = pos + HEADER_SIZE + length
        if end > len(data):
            return records, None, TornTail(name, pos, rest)
        head = HEADER.pack(magic, version, rtype, txn, epoch, step, length, 0)
        payload = bytes(data[pos + HEADER_SIZE:end])
        if zlib.crc32(payload, zlib.crc32(head)) != crc:
            return records, WalCorruption(name, pos, "record CRC32 mismatch"), None
        records.append(WalRecord(RecordType(rtype), txn, epoch, step, payload, name, pos))
        pos = end
    return records, None, None


def _header_problem(magic: bytes, version: int, rtype: int, length: int) -> str:
    if magic != MAGIC:
        return f"bad magic {magic!r}"
    if version != VERSION:
        return f"unsupported version {version}"
    if rtype not in RecordType._value2member_map_:
        return f"unknown record type {rtype}"
    if length > MAX_PAYLOAD:
        return f"payload length {length} exceeds {MAX_PAYLOAD}"
    return ""


def replay(directory: str | os.PathLike[str], *, strict: bool = False) -> ReplayResult:
    """Read every segment in order. With `strict`, the first corruption raises WalCorruptionError."""
    result = ReplayResult()
    for path in segment_paths(Path(directory)):
        records: list[WalRecord] = []
        corruption: WalCorruption | None
        torn: TornTail | None = None
        try:
            data = read_regular(path, MAX_SEGMENT_BYTES)
        except UnsafeFileError as exc:
            corruption = WalCorruption(path.name, 0, f"not read: {exc}")
        else:
            records, corruption, torn = scan_segment(data, path.name)
        result.records.extend(records)
        if corruption is not None:
            if strict:
                raise WalCorruptionError(corruption)
            result.corruptions.append(corruption)
        if torn is not None:
            result.torn.append(torn)
    return result


class WriteAheadLog:
    """The single writer of a WAL directory. Thread-safe; every append is durable on return.

    Durability: the segment is opened with O_DSYNC where the OS has it, else each record is
    followed by fsync. With `fsync=False` appends are only as durable as the page cache (tests).
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int = 16 * 1024 * 1024,
                 fsync: bool = True) -> None:
        if max_bytes < HEADER_SIZE:
            raise ValueError(f"wal max_bytes={max_bytes} is below one header ({HEADER_SIZE}); use at least 4096")
        if max_bytes > MAX_WAL_BYTES:
            raise ValueError(f"wal max_bytes={max_bytes} is over {MAX_WAL_BYTES}; segments that large are refused "
                             "on replay: use at most 256 MiB")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd = -1
        self._size = 0
        self._index = 0
        self.recovered_events: list[str] = []
        self._open_tail()

    # ------------------------------------------------------------------ public

    def append(self, rtype: RecordType, txn_id: int, epoch: int, step: int, payload: bytes = b"") -> WalRecord:
        """Append one record and return it (with segment and offset); durable when this returns."""
        frame = encode_record(rtype, txn_id, epoch, step, payload)
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"WAL {self.directory} is closed; open a new WriteAheadLog")
            if self._size > 0 and self._size + len(frame) > self.max_bytes:
                self._rotate()
            offset = self._size
            try:
                write_all(self._fd, frame)
                if self.fsync and not _HAS_DSYNC:
                    os.fsync(self._fd)
            except OSError:
                # A partial frame would be a torn record mid-segment once more records follow it.
                os.ftruncate(self._fd, offset)
                raise
            self._size += len(frame)
            return WalRecord(rtype, txn_id, epoch, step, payload, segment_name(self._index), offset)

    def segments(self) -> list[Path]:
        return segment_paths(self.directory)

    @property
    def active_segment(self) -> str:
        return segment_name(self._index)

    def prune(self, keep_from_txn: int) -> list[str]:
        """Delete closed segments whose records all belong to transactions before `keep_from_txn`."""
        removed: list[str] = []
        with self._lock:
            for path in self.segments():
                if path.name == self.active_segment:
                    continue
                try:
                    records, corruption, _ = scan_segment(read_regular(path, MAX_SEGMENT_BYTES), path.name)
                except UnsafeFileError:
                    continue  # not ours to delete; replay reports it
                if corruption is not None or any(r.txn_id >= keep_from_txn for r in records):
                    continue  # corrupt segments are evidence; keep them for `inspect`
                path.unlink()
                removed.append(path.name)
            if removed and self.fsync:
                fsync_dir(self.directory)
        return removed

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # ------------------------------------------------------------------ internals

    def _open_tail(self) -> None:
        paths = self.segments()
        if not paths:
            self._open_segment(1)
            return
        last = paths[-1]
        index = int(SEGMENT_RE.match(last.name).group(1))  # type: ignore[union-attr]
        corruption: WalCorruption | None
        torn: TornTail | None
        try:
            _, corruption, torn = scan_segment(read_regular(last, MAX_SEGMENT_BYTES), last.name)
        except UnsafeFileError as exc:
            corruption, torn = WalCorruption(last.name, 0, f"not read: {exc}"), None
        if corruption is not None:
            self.recovered_events.append(f"{corruption}; new records go to {segment_name(index + 1)}")
            self._open_segment(index + 1)
            return
        if torn is not None:
            os.truncate(last, torn.offset)
            self.recovered_events.append(f"{torn}; truncated")
        self._open_segment(index)

    def _open_segment(self, index: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        if self.fsync and _HAS_DSYNC:
            flags |= os.O_DSYNC
        path = self.directory / segment_name(index)
        created = not path.exists()
        if not created and not path.is_file() or path.is_symlink():
            raise UnsafeFileError(f"{path} is not a regular file; the WAL cannot be appended to it: remove it "
                                  "or restore the run directory from a trusted copy")
        self._fd = os.open(path, flags | os.O_NOFOLLOW, 0o644)
        self._size = os.fstat(self._fd).st_size
        self._index = index
        if created and self.fsync:
            fsync_dir(self.directory)

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        self._open_segment(self._index + 1)


_HAS_DSYNC = hasattr(os, "O_DSYNC")

