"""Cross-process emergency broadcast over POSIX shared memory (layout: `signal.md`).

One process *owns* a run's channel (`EmergencyChannel.create`); workers, supervisors and other
ranks on the host `attach` by the channel's key. A trainer keys its channel by the run, not by the
config (`run_channel_key`): two runs of one config (a sweep) must not share a channel. The owner
(or any attached process) raises an `EmergencySignal`; every participant sees it without the
message bus and acknowledges it.

Contracts:

- The channel carries the *latest* signal. Publication is a seqlock: the sequence number is odd
  while the record is being written and even once it is stable; the record is written before the
  even sequence is stored. A reader copies the record between two reads of the sequence and
  retries if they differ or are odd, so it never returns a torn record. A burst of raises between
  two reads collapses to the newest; `Received.missed` says how many were superseded.
- Why plain stores are enough: CPython's `struct.pack_into` into an mmap is a `memcpy`, not an
  atomic with a fence. On x86 (TSO) stores become visible in program order and loads are not
  reordered with loads, so the seqlock is exact. On ARM the hardware may reorder, so every record
  also carries the sequence it belongs to and a BLAKE2b checksum; a reader rejects (and retries)
  any copy whose checksum or sequence echo does not match. Rejections are counted in
  `torn_rejected`, never returned.
- Writers (raises, slot claims) are serialized across processes with `flock` on the segment and,
  within one channel object, across threads with a lock (a `flock` held through one file
  descriptor does not exclude a second thread using the same descriptor).
- Waiting never sleep-polls at 100 ms. A registered participant blocks in `select` on its slot's
  doorbell (a FIFO next to the segment) that every raise rings after publishing, so it wakes
  within microseconds and costs no CPU while idle; it re-checks the sequence at least every 20 ms
  in case a ring is missed. Other waiters spin ~50 µs, then sleep in steps from 20 µs up to
  `max_sleep_s` (200 µs). A raiser waiting for acks spins with `sched_yield` for 2 ms first.
- A segment whose owner pid is dead is stale: `create` unlinks and recreates it. A live owner of
  the same run name is refused with `ChannelBusyError`.
- The segment is not registered with multiprocessing's resource tracker (on Python < 3.13 an
  attaching process would otherwise unlink the owner's segment when it exits, and every unlink
  would print tracker warnings). The owner unlinks on `close()`, on interpreter exit, and stale
  segments are reclaimed by the next `create`. A `create` that fails after making the segment
  unlinks it again.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import os
import re
import select
import struct
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from types import TracebackType

from esper.leyline import EmergencySignal, LeylineDecodeError, parse, serialize
from esper.tolaria.recovery.shm import open_segment, pid_alive, unlink_segment

MAGIC = b"ESPEREMG"
LAYOUT_VERSION = 1
MAX_PAYLOAD_BYTES = 1024
MAX_REASON_BYTES = 512
MAX_SLOTS = 256
NAME_BYTES = 32

# Header: magic, layout version, n_slots, owner pid, created (time_ns), sequence. 64 bytes.
_HEADER = struct.Struct("<8sIIqqQ")
_SEQ_OFFSET = 32
_HEADER_SIZE = 64
# Record: sequence echo, level, payload length, monotonic ms, origin, checksum; then the payload.
_RECORD = struct.Struct("<QIIQ32s16s")
_RECORD_OFFSET = _HEADER_SIZE
_PAYLOAD_OFFSET = _RECORD_OFFSET + _RECORD.size
_SLOTS_OFFSET = 1216  # _PAYLOAD_OFFSET + MAX_PAYLOAD_BYTES rounded up to 64
# Slot: participant name, pid, acked sequence, heartbeat (monotonic ns), in-use flag. 64 bytes.
_SLOT = struct.Struct("<32sqQqI")
_SLOT_SIZE = 64
_SLOT_ACK_OFFSET = 40
_SLOT_HEARTBEAT_OFFSET = 48
_SLOT_IN_USE_OFFSET = 56
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")

_READ_ATTEMPTS = 256
_SPIN_S = 50e-6
_ACK_SPIN_S = 100e-6  # the raiser spins (yielding the CPU) this long for acks before it sleeps
_BELL_SAFETY_S = 0.02  # a doorbell wait re-checks the sequence at least this often
_MIN_SLEEP_S = 20e-6
DEFAULT_MAX_SLEEP_S = 200e-6


class ChannelError(RuntimeError):
    """A shared-memory emergency channel could not be created, attached or used."""


class ChannelBusyError(ChannelError):
    """Another live process (`owner_pid`) already owns the channel for this key."""

    def __init__(self, message: str, owner_pid: int) -> None:
        super().__init__(message)
        self.owner_pid = owner_pid


@dataclass(frozen=True)
class Received:
    """One signal read from the channel: `seq` is what participants acknowledge."""

    seq: int
    signal: EmergencySignal
    missed: int  # raises superseded between the caller's `after_seq` and this one


@dataclass(frozen=True)
class ParticipantInfo:
    slot: int
    name: str
    pid: int
    acked_seq: int
    heartbeat_ns: int


def segment_name(run_name: str) -> str:
    """The POSIX shared-memory name for `run_name` (Linux: /dev/shm/<name>)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_name)[:200]
    if not safe:
        raise ValueError("run_name is empty: give the run a name (config run.name)")
    return f"esper-emg-{safe}"


def segment_size(n_slots: int) -> int:
    return _SLOTS_OFFSET + n_slots * _SLOT_SIZE


def signal_checksum(signal: EmergencySignal) -> bytes:
    """BLAKE2b-16 of the signal's deterministic bytes with `payload_checksum` cleared."""
    copy = EmergencySignal()
    copy.CopyFrom(signal)
    copy.ClearField("payload_checksum")
    return hashlib.blake2b(copy.SerializeToString(deterministic=True), digest_size=16).digest()


def _buf_of(shm: SharedMemory) -> memoryview:
    buf = shm.buf
    if buf is None:
        raise ChannelError(f"shared-memory segment {shm.name} is already closed")
    return buf


def _checksum(seq: int, level: int, mono_ms: int, origin: bytes, payload: bytes) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(struct.pack("<QIQ", seq, level, mono_ms))
    digest.update(origin)
    digest.update(payload)
    return digest.digest()


class EmergencyChannel:
    """A run's shared-memory emergency channel. Use `create` (owner) or `attach` (participant)."""

    def __init__(self, shm: SharedMemory, run_name: str, *, owner: bool, max_sleep_s: float) -> None:
        self._shm = shm
        self._buf = _buf_of(shm)
        self.run_name = run_name
        self.name = shm.name.lstrip("/")
        self.owner = owner
        self.max_sleep_s = max_sleep_s
        self.n_slots = self._read_header()[2]
        self.torn_rejected = 0
        self.stale_cleaned = False
        self._dir = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        self._lock_fd = self._open_lock_file()
        self._bells: dict[int, tuple[int, int]] = {}  # our slots' doorbells: (read fd, keep-alive write fd)
        self._thread_lock = threading.Lock()  # flock does not exclude threads sharing our descriptor
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, run_name: str, n_slots: int = 16, *, max_sleep_s: float = DEFAULT_MAX_SLEEP_S) -> EmergencyChannel:
        """Create the run's channel, reclaiming a stale segment left by a dead owner.

        Raises `ChannelBusyError` if a live process already owns a channel with this run name."""
        if not 1 <= n_slots <= MAX_SLOTS:
            raise ValueError(f"n_slots={n_slots}: choose 1..{MAX_SLOTS} participant slots")
        name = segment_name(run_name)
        stale = False
        try:
            shm = open_segment(name, create=True, size=segment_size(n_slots))
        except FileExistsError:
            cls._reclaim_stale(name, run_name)
            stale = True
            shm = open_segment(name, create=True, size=segment_size(n_slots))
        try:
            _HEADER.pack_into(_buf_of(shm), 0, MAGIC, LAYOUT_VERSION, n_slots, os.getpid(), time.time_ns(), 0)
            channel = cls(shm, run_name, owner=True, max_sleep_s=max_sleep_s)
        except BaseException:
            unlink_segment(shm)  # a failed start leaves no segment behind
            shm.close()
            raise
        channel.stale_cleaned = stale
        _OWNED.add(channel.name)
        atexit.register(channel.close)
        return channel

    @classmethod
    def attach(cls, run_name: str, *, max_sleep_s: float = DEFAULT_MAX_SLEEP_S) -> EmergencyChannel:
        """Attach to the channel the run's owner created; `ChannelError` if there is none."""
        name = segment_name(run_name)
        try:
            shm = open_segment(name, create=False)
        except FileNotFoundError as exc:
            raise ChannelError(
                f"no emergency channel for run {run_name!r} (/dev/shm/{name}): start the run's trainer first"
            ) from exc
        try:
            cls._check_layout(shm, run_name)
        except ChannelError:
            shm.close()
            raise
        return cls(shm, run_name, owner=False, max_sleep_s=max_sleep_s)

    @staticmethod
    def _check_layout(shm: SharedMemory, run_name: str) -> None:
        if shm.size < _HEADER_SIZE:
            raise ChannelError(f"segment {shm.name} for run {run_name!r} is {shm.size} bytes, too small for a channel")
        magic, version, n_slots, *_ = _HEADER.unpack_from(_buf_of(shm), 0)
        if magic != MAGIC or version != LAYOUT_VERSION:
            raise ChannelError(
                f"segment {shm.name} for run {run_name!r} is not an Esper emergency channel of layout "
                f"{LAYOUT_VERSION} (magic {magic!r}, version {version}); remove /dev/shm/{shm.name.lstrip('/')}"
            )
        if shm.size < segment_size(n_slots):
            raise ChannelError(f"segment {shm.name} is truncated ({shm.size} bytes for {n_slots} slots)")

    @classmethod
    def _reclaim_stale(cls, name: str, run_name: str) -> None:
        try:
            shm = open_segment(name, create=False)
        except FileNotFoundError:
            return  # it vanished between our attempts: nothing to reclaim
        try:
            header = _HEADER.unpack_from(_buf_of(shm), 0) if shm.size >= _HEADER_SIZE else (b"", 0, 0, 0, 0, 0)
            magic, owner_pid = header[0], header[3]
            if magic not in (MAGIC, bytes(8), b""):
                raise ChannelError(
                    f"/dev/shm/{name} exists but is not an Esper emergency channel (magic {magic!r}); "
                    "remove it or choose another run name"
                )
            live_elsewhere = owner_pid != os.getpid() and pid_alive(owner_pid)
            if live_elsewhere or name in _OWNED:
                raise ChannelBusyError(
                    f"run {run_name!r} is already active in pid {owner_pid}; stop it or choose another run name",
                    owner_pid,
                )
            unlink_segment(shm)  # the owner died without unlinking: a stale segment
            _remove_bells(name)
        finally:
            shm.close()

    def close(self) -> None:
        """Detach; the owner also unlinks the segment. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self.owner:
            _OWNED.discard(self.name)
            atexit.unregister(self.close)
        for slot in list(self._bells):
            self._close_bell(slot)
        os.close(self._lock_fd)
        self._buf.release()
        if self.owner:
            unlink_segment(self._shm)
            _remove_bells(self.name)
        self._shm.close()

    def unlink(self) -> None:
        """Remove the segment now (any process may, e.g. a supervisor cleaning up a crashed run)."""
        unlink_segment(self._shm)

    def __enter__(self) -> EmergencyChannel:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ header

    def _read_header(self) -> tuple[bytes, int, int, int, int, int]:
        magic, version, n_slots, pid, created, seq = _HEADER.unpack_from(self._buf, 0)
        return magic, version, n_slots, pid, created, seq

    @property
    def owner_pid(self) -> int:
        return self._read_header()[3]

    @property
    def created_ns(self) -> int:
        return self._read_header()[4]

    def sequence(self) -> int:
        """The current sequence number (even: stable; odd: a raise is being written)."""
        return int(_U64.unpack_from(self._buf, _SEQ_OFFSET)[0])

    def _open_lock_file(self) -> int:
        # flock on the segment's own file serializes writers across processes (Linux: /dev/shm).
        path = os.path.join(self._dir, self.name)
        if not os.path.exists(path):
            path = os.path.join(self._dir, f"{self.name}.lock")
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    @contextmanager
    def _writer(self) -> Iterator[None]:
        if self._closed:
            raise ChannelError(f"emergency channel for run {self.run_name!r} is closed")
        with self._thread_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ raise and read

    def raise_signal(self, signal: EmergencySignal) -> int:
        """Publish `signal` to every process attached to this run; returns its sequence number.

        A reason longer than MAX_REASON_BYTES is truncated (and marked) so the record fits;
        a signal that still exceeds MAX_PAYLOAD_BYTES raises `ChannelError`."""
        payload = self._encode(signal)
        origin = signal.origin.encode()[:NAME_BYTES]
        with self._writer():
            seq = self.sequence()
            if seq & 1:
                seq += 1  # a writer died mid-raise; its half record is superseded by this one
            writing, stable = seq + 1, seq + 2
            _U64.pack_into(self._buf, _SEQ_OFFSET, writing)
            mono_ms = signal.monotonic_time_ms
            checksum = _checksum(stable, signal.level, mono_ms, origin, payload)
            _RECORD.pack_into(self._buf, _RECORD_OFFSET, stable, signal.level, len(payload), mono_ms, origin, checksum)
            self._buf[_PAYLOAD_OFFSET : _PAYLOAD_OFFSET + len(payload)] = payload
            _U64.pack_into(self._buf, _SEQ_OFFSET, stable)  # publish: the record above is complete
        self._ring_bells()
        return stable

    @staticmethod
    def _encode(signal: EmergencySignal) -> bytes:
        if len(signal.reason.encode()) > MAX_REASON_BYTES:
            trimmed = EmergencySignal()
            trimmed.CopyFrom(signal)
            cut = signal.reason.encode()[: MAX_REASON_BYTES - 16].decode(errors="ignore")
            trimmed.reason = cut + " …[truncated]"
            signal = trimmed
        payload = serialize(signal)
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ChannelError(
                f"EmergencySignal serializes to {len(payload)} bytes; the channel record holds "
                f"{MAX_PAYLOAD_BYTES}: shorten its attributes"
            )
        return payload

    def read(self, after_seq: int = 0) -> Received | None:
        """The current signal if its sequence is newer than `after_seq`, else None. Never torn."""
        for _ in range(_READ_ATTEMPTS):
            seq = self.sequence()
            if seq <= after_seq:
                return None
            if seq & 1:
                continue  # a writer is mid-record; it finishes within microseconds
            raw = bytes(self._buf[_RECORD_OFFSET : _PAYLOAD_OFFSET + MAX_PAYLOAD_BYTES])
            if self.sequence() != seq:
                continue
            got = self._decode(seq, raw)
            if got is not None:
                missed = max(0, (seq - after_seq) // 2 - 1) if after_seq else max(0, seq // 2 - 1)
                return Received(seq=seq, signal=got, missed=missed)
        return None  # a writer is stuck mid-record (or died there); the next raise repairs it

    def _decode(self, seq: int, raw: bytes) -> EmergencySignal | None:
        echo, level, length, mono_ms, origin, checksum = _RECORD.unpack_from(raw, 0)
        payload = raw[_RECORD.size : _RECORD.size + min(length, MAX_PAYLOAD_BYTES)]
        origin = origin.rstrip(b"\0")
        if echo != seq or length > MAX_PAYLOAD_BYTES or checksum != _checksum(echo, level, mono_ms, origin, payload):
            self.torn_rejected += 1  # second line of defence: a reordered store slipped past the seqlock
            return None
        try:
            return parse(EmergencySignal, payload)
        except LeylineDecodeError:
            self.torn_rejected += 1
            return None

    def wait_entry(self, after_seq: int, timeout_s: float) -> Received | None:
        """Block until a signal newer than `after_seq` is published, or `timeout_s` passes (None).

        A registered participant sleeps in `select` on its doorbell (woken within microseconds of
        a raise, no CPU while idle); any other caller spins briefly, then sleeps in short steps."""
        deadline = time.perf_counter() + timeout_s
        if self._bells:
            return self._wait_on_bell(after_seq, deadline)
        for _ in self._backoff(deadline):
            got = self.read(after_seq)
            if got is not None:
                return got
        return self.read(after_seq)

    def wait(self, after_seq: int, timeout_s: float) -> EmergencySignal | None:
        """Like `wait_entry`, returning only the signal (use `wait_entry` to learn its sequence)."""
        got = self.wait_entry(after_seq, timeout_s)
        return got.signal if got is not None else None

    def _wait_on_bell(self, after_seq: int, deadline: float) -> Received | None:
        bell = next(iter(self._bells.values()))[0]
        while True:
            got = self.read(after_seq)  # checked before sleeping: a ring that came first is not lost
            remaining = deadline - time.perf_counter()
            if got is not None or remaining <= 0:
                return got
            ready, _, _ = select.select([bell], [], [], min(remaining, _BELL_SAFETY_S))
            if ready:
                _drain(bell)

    def _backoff(self, deadline: float, spin_s: float = _SPIN_S) -> Iterator[None]:
        """Yield until `deadline`: spin (yielding the CPU) for `spin_s`, then sleep in steps growing
        to `max_sleep_s`."""
        spin_until = time.perf_counter() + spin_s
        sleep = _MIN_SLEEP_S
        while True:
            now = time.perf_counter()
            if now >= deadline:
                return
            yield
            if now < spin_until:
                os.sched_yield()  # on a busy host, let the participants we wait for run
            else:
                time.sleep(min(sleep, max(0.0, deadline - now)))
                sleep = min(sleep * 2, self.max_sleep_s)

    # ------------------------------------------------------------------ participants

    def register_participant(self, name: str) -> int:
        """Claim a free ack slot for this process (or reclaim one whose pid is dead); returns it."""
        encoded = name.encode()[:NAME_BYTES]
        with self._writer():
            for slot in range(self.n_slots):
                _, pid, _, _, in_use = _SLOT.unpack_from(self._buf, self._slot_offset(slot))
                if in_use and pid_alive(pid):
                    continue
                acked = self.sequence() & ~1  # a new participant owes no ack for signals before it
                self._open_bell(slot)
                _SLOT.pack_into(self._buf, self._slot_offset(slot), encoded, os.getpid(), acked, time.monotonic_ns(), 1)
                return slot
        raise ChannelError(
            f"all {self.n_slots} participant slots of run {self.run_name!r} are held by live processes: "
            "create the channel with more n_slots"
        )

    def release_participant(self, slot: int) -> None:
        """Give `slot` back (a participant leaving cleanly)."""
        with self._writer():
            _SLOT.pack_into(self._buf, self._slot_offset(self._check_slot(slot)), b"", 0, 0, 0, 0)
        self._close_bell(slot)

    def ack(self, participant_slot: int, seq: int) -> None:
        """Record that this participant has handled signal `seq` (also a heartbeat)."""
        offset = self._slot_offset(self._check_slot(participant_slot))
        # The participant is the only writer of its slot: heartbeat, then the ack the raiser waits on.
        _I64.pack_into(self._buf, offset + _SLOT_HEARTBEAT_OFFSET, time.monotonic_ns())
        _U64.pack_into(self._buf, offset + _SLOT_ACK_OFFSET, seq)

    def heartbeat(self, participant_slot: int) -> None:
        """Record that this participant is alive (CLOCK_MONOTONIC ns, comparable across processes)."""
        offset = self._slot_offset(self._check_slot(participant_slot))
        _I64.pack_into(self._buf, offset + _SLOT_HEARTBEAT_OFFSET, time.monotonic_ns())

    def acked(self, seq: int, participants: Iterable[int]) -> set[int]:
        """The subset of `participants` whose acked sequence is at least `seq`."""
        return {
            slot
            for slot in participants
            if _U64.unpack_from(self._buf, self._slot_offset(self._check_slot(slot)) + _SLOT_ACK_OFFSET)[0] >= seq
        }

    def wait_for_acks(self, seq: int, participants: Iterable[int], timeout_s: float) -> set[int]:
        """Wait until every slot in `participants` acked `seq` or `timeout_s` passes; returns who acked."""
        wanted = set(participants)
        deadline = time.perf_counter() + timeout_s
        for _ in self._backoff(deadline, spin_s=_ACK_SPIN_S):
            done = self.acked(seq, wanted)
            if done == wanted:
                return done
        return self.acked(seq, wanted)

    def participants(self) -> list[ParticipantInfo]:
        """Every claimed slot, live or not (check `pid_alive(info.pid)`)."""
        found = []
        for slot in range(self.n_slots):
            name, pid, acked, heartbeat, in_use = _SLOT.unpack_from(self._buf, self._slot_offset(slot))
            if in_use:
                found.append(ParticipantInfo(slot, name.rstrip(b"\0").decode(errors="replace"), pid, acked, heartbeat))
        return found

    def live_participants(self) -> list[int]:
        """Slots held by processes that are still alive: the set a CRITICAL raise waits on."""
        return [info.slot for info in self.participants() if pid_alive(info.pid)]

    # ------------------------------------------------------------------ doorbells

    def _bell_path(self, slot: int) -> str:
        return os.path.join(self._dir, f"{self.name}.bell{slot}")

    def _open_bell(self, slot: int) -> None:
        """A FIFO per participant slot: a raise writes a byte to wake the participant's `select`."""
        self._close_bell(slot)
        path = self._bell_path(slot)
        try:
            os.unlink(path)  # a dead participant's FIFO: nobody reads it any more
        except FileNotFoundError:
            pass
        os.mkfifo(path, 0o600)
        read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        # Our own writer keeps the FIFO from reporting hang-up (and `select` from spinning)
        # after a raiser's short-lived write end closes.
        keep_fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        self._bells[slot] = (read_fd, keep_fd)

    def _close_bell(self, slot: int) -> None:
        fds = self._bells.pop(slot, None)
        if fds is None:
            return
        for fd in fds:
            os.close(fd)
        try:
            os.unlink(self._bell_path(slot))
        except FileNotFoundError:
            pass

    def _ring_bells(self) -> None:
        """Wake every participant blocked in `wait_entry`; a missing or full doorbell is skipped
        (that participant has left, or is already due to wake)."""
        for slot in range(self.n_slots):
            if not _U32.unpack_from(self._buf, self._slot_offset(slot) + _SLOT_IN_USE_OFFSET)[0]:
                continue
            try:
                fd = os.open(self._bell_path(slot), os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue  # no FIFO, or no reader (ENXIO): nobody to wake on this slot
            try:
                os.write(fd, b"!")
            except (BlockingIOError, BrokenPipeError):
                pass  # full: a wake-up is already pending; broken: the reader just left
            finally:
                os.close(fd)

    def _check_slot(self, slot: int) -> int:
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"participant slot {slot} is outside 0..{self.n_slots - 1}: use register_participant()")
        return slot

    @staticmethod
    def _slot_offset(slot: int) -> int:
        return _SLOTS_OFFSET + slot * _SLOT_SIZE


# Segment names owned by live channels in this process: lets create() refuse a second owner here.
_OWNED: set[str] = set()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        return  # empty: every pending ring consumed


def _remove_bells(name: str) -> None:
    """Delete a segment's doorbell FIFOs (owner close, stale reclaim)."""
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    bell = re.compile(re.escape(name) + r"\.bell\d+")
    for entry in os.listdir(directory):
        if bell.fullmatch(entry):
            try:
                os.unlink(os.path.join(directory, entry))
            except FileNotFoundError:
                pass
