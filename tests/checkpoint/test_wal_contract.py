"""The WAL writer's contract: what an append returns, where records go, what replay reports and
how a failed append, a closed log, a hostile segment and pruning behave."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import esper.tolaria.checkpoint.wal as wal_module
from esper.tolaria.checkpoint.layout import UnsafeFileError
from esper.tolaria.checkpoint.wal import (
    HEADER,
    HEADER_CRC,
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    MAX_WAL_BYTES,
    RecordType,
    WalCorruptionError,
    WriteAheadLog,
    encode_record,
    replay,
    scan_segment,
)


def _frame(payload: bytes = b"p") -> int:
    return len(encode_record(RecordType.BEGIN, 1, 0, 0, payload))


def test_an_append_returns_the_record_replay_reads_back(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, fsync=False)
    returned = [wal.append(RecordType.BEGIN, 7, 3, 30, b"ckpt"), wal.append(RecordType.COMMIT, 7, 3, 30, b"c")]
    wal.close()
    assert replay(tmp_path).records == returned
    assert returned[1].segment == "wal-000001.log" and returned[1].offset == HEADER_SIZE + 4


def test_a_record_without_payload_is_exactly_one_header(tmp_path: Path) -> None:
    assert encode_record(RecordType.ABORT, 1, 2, 3) == encode_record(RecordType.ABORT, 1, 2, 3, b"")
    assert len(encode_record(RecordType.ABORT, 1, 2, 3)) == HEADER_SIZE


def test_the_wal_directory_is_created_with_its_parents(tmp_path: Path) -> None:
    WriteAheadLog(tmp_path / "a" / "b" / "wal", fsync=False).close()
    assert (tmp_path / "a" / "b" / "wal" / "wal-000001.log").is_file()


def test_segments_are_created_owner_writable_and_never_executable(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        WriteAheadLog(tmp_path, fsync=False).close()
    finally:
        os.umask(previous)
    assert (tmp_path / "wal-000001.log").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------- limits, inclusive


def test_the_size_limits_are_inclusive(tmp_path: Path) -> None:
    WriteAheadLog(tmp_path / "small", max_bytes=HEADER_SIZE, fsync=False).close()
    WriteAheadLog(tmp_path / "big", max_bytes=MAX_WAL_BYTES, fsync=False).close()
    with pytest.raises(ValueError, match="below one header"):
        WriteAheadLog(tmp_path / "x", max_bytes=HEADER_SIZE - 1)
    with pytest.raises(ValueError, match="use at most 256 MiB"):
        WriteAheadLog(tmp_path / "y", max_bytes=MAX_WAL_BYTES + 1)
    assert len(encode_record(RecordType.COMMAND, 1, 0, 0, bytes(MAX_PAYLOAD))) == HEADER_SIZE + MAX_PAYLOAD
    with pytest.raises(ValueError, match="journal a reference instead"):
        encode_record(RecordType.COMMAND, 1, 0, 0, bytes(MAX_PAYLOAD + 1))


def test_a_header_claiming_the_largest_payload_is_a_torn_tail_not_corruption() -> None:
    head = HEADER.pack(MAGIC, 1, int(RecordType.COMMAND), 1, 0, 0, MAX_PAYLOAD, 0)
    data = head + HEADER_CRC.pack(zlib.crc32(head)) + b"only part of the payload"
    records, corruption, torn = scan_segment(data, "wal-000001.log")
    assert records == [] and corruption is None and torn is not None and torn.offset == 0


# ---------------------------------------------------------------- rotation


def test_segments_fill_to_exactly_max_bytes_and_rotate_to_the_next_index(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, max_bytes=2 * _frame(), fsync=False)
    for txn in (1, 2, 3):
        wal.append(RecordType.BEGIN, txn, 0, 0, b"p")
    wal.close()
    assert [(r.segment, r.txn_id) for r in replay(tmp_path).records] == [
        ("wal-000001.log", 1), ("wal-000001.log", 2), ("wal-000002.log", 3)]
    assert [p.name for p in wal.segments()] == ["wal-000001.log", "wal-000002.log"]


def test_a_record_bigger_than_a_segment_goes_into_the_empty_first_segment(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, max_bytes=HEADER_SIZE, fsync=False)
    wal.append(RecordType.BEGIN, 1, 0, 0, b"larger than the whole segment")
    wal.close()
    assert [p.name for p in wal.segments()] == ["wal-000001.log"]
    assert [r.txn_id for r in replay(tmp_path).records] == [1]


# ---------------------------------------------------------------- a failed append, a closed log


def test_a_failed_append_leaves_no_partial_record_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wal = WriteAheadLog(tmp_path, fsync=False)
    wal.append(RecordType.BEGIN, 1, 0, 0, b"kept")
    size = (tmp_path / "wal-000001.log").stat().st_size

    def half_then_full_disk(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wal_module, "write_all", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        wal.append(RecordType.COMMIT, 1, 0, 0, b"lost")
    assert (tmp_path / "wal-000001.log").stat().st_size == size
    monkeypatch.undo()
    wal.append(RecordType.ABORT, 1, 0, 0, b"after")
    wal.close()
    result = replay(tmp_path)
    assert [(r.type, r.payload) for r in result.records] == [(RecordType.BEGIN, b"kept"), (RecordType.ABORT, b"after")]
    assert result.events == []


def test_a_closed_wal_refuses_appends_and_writes_nowhere(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, fsync=False)
    wal.close()
    wal.close()  # closing twice is harmless
    with pytest.raises(ValueError, match="is closed; open a new WriteAheadLog"):
        wal.append(RecordType.BEGIN, 1, 0, 0)


def test_a_rotation_that_cannot_open_the_next_segment_leaves_the_wal_closed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not ours")
    directory = tmp_path / "wal"
    wal = WriteAheadLog(directory, max_bytes=_frame(), fsync=False)
    wal.append(RecordType.BEGIN, 1, 0, 0, b"p")
    (directory / "wal-000002.log").symlink_to(outside)  # planted where the next segment goes
    with pytest.raises(UnsafeFileError, match="is not a regular file"):
        wal.append(RecordType.BEGIN, 2, 0, 0, b"p")
    with pytest.raises(ValueError, match="is closed"):
        wal.append(RecordType.BEGIN, 3, 0, 0, b"p")
    assert outside.read_bytes() == b"not ours"


def test_a_symlinked_segment_to_a_regular_file_is_never_appended_to(tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"")
    directory = tmp_path / "wal"
    wal = WriteAheadLog(directory, max_bytes=_frame(), fsync=False)
    wal.append(RecordType.BEGIN, 1, 0, 0, b"p")
    (directory / "wal-000002.log").symlink_to(outside)
    with pytest.raises(UnsafeFileError):
        wal.append(RecordType.BEGIN, 2, 0, 0, b"p")
    assert outside.read_bytes() == b""


# ---------------------------------------------------------------- what replay and a reopen report


def test_a_torn_tail_is_reported_with_its_segment_offset_and_length(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, fsync=False)
    wal.append(RecordType.BEGIN, 1, 0, 0, b"whole")
    wal.close()
    with (tmp_path / "wal-000001.log").open("ab") as f:
        f.write(encode_record(RecordType.COMMIT, 1, 0, 0, b"torn")[:10])
    offset = HEADER_SIZE + 5
    assert replay(tmp_path).events == [f"wal-000001.log torn tail at offset {offset} (10 bytes) treated as end of log"]
    reopened = WriteAheadLog(tmp_path, fsync=False)
    reopened.close()
    assert reopened.recovered_events == [
        f"wal-000001.log torn tail at offset {offset} (10 bytes) treated as end of log; truncated"]


def test_a_torn_header_and_a_torn_payload_are_each_reported_as_torn_at_the_record(tmp_path: Path) -> None:
    whole = encode_record(RecordType.BEGIN, 1, 0, 0, b"first")
    torn_payload = encode_record(RecordType.COMMIT, 1, 0, 0, b"payload")[:-3]
    _, _, torn = scan_segment(whole + torn_payload, "wal-000003.log")
    assert torn is not None and (torn.segment, torn.offset, torn.trailing_bytes) == (
        "wal-000003.log", len(whole), len(torn_payload))
    _, _, torn = scan_segment(whole + torn_payload[:HEADER_SIZE - 1], "wal-000003.log")
    assert torn is not None and (torn.segment, torn.offset, torn.trailing_bytes) == (
        "wal-000003.log", len(whole), HEADER_SIZE - 1)
    _, _, torn = scan_segment(whole + bytes(HEADER_SIZE + 9), "wal-000003.log")  # a zero-filled tail
    assert torn is not None and (torn.segment, torn.offset, torn.trailing_bytes) == (
        "wal-000003.log", len(whole), HEADER_SIZE + 9)


def test_a_bad_record_checksum_is_reported_with_its_segment_and_offset(tmp_path: Path) -> None:
    first = encode_record(RecordType.BEGIN, 1, 0, 0, b"first")
    bad = bytearray(encode_record(RecordType.COMMIT, 1, 0, 0, b"payload"))
    bad[-1] ^= 0x01
    (tmp_path / "wal-000001.log").write_bytes(first + bytes(bad) + encode_record(RecordType.ABORT, 2, 0, 0))
    result = replay(tmp_path)
    assert result.events == [f"wal-000001.log corrupt record at offset {len(first)}: record CRC32 mismatch"]
    with pytest.raises(WalCorruptionError) as info:
        replay(tmp_path, strict=True)
    assert info.value.corruption == result.corruptions[0]
    assert "restore from the previous checkpoint or inspect the segment with `tolaria inspect`" in str(info.value)


def test_a_header_that_frames_well_but_names_an_unknown_version_is_corruption() -> None:
    head = HEADER.pack(MAGIC, 2, int(RecordType.BEGIN), 1, 0, 0, 0, 0)
    crc = zlib.crc32(b"", zlib.crc32(head))
    body = HEADER.pack(MAGIC, 2, int(RecordType.BEGIN), 1, 0, 0, 0, crc)
    records, corruption, torn = scan_segment(body + HEADER_CRC.pack(zlib.crc32(body)), "wal-000001.log")
    assert records == [] and torn is None
    assert corruption is not None and (corruption.offset, corruption.reason) == (0, "unsupported version 2")


def test_a_damaged_header_is_reported_as_a_header_checksum_mismatch() -> None:
    data = bytearray(encode_record(RecordType.BEGIN, 1, 0, 0, b"x") + encode_record(RecordType.BEGIN, 2, 0, 0, b"y"))
    data[8] ^= 0x01  # the txn id of the first record: magic, version and type still read as valid
    _, corruption, _ = scan_segment(bytes(data), "wal-000001.log")
    assert corruption is not None and corruption.reason == "header CRC32 mismatch"


def test_reopening_a_log_whose_last_segment_is_corrupt_writes_to_the_next_one(tmp_path: Path) -> None:
    bad = bytearray(encode_record(RecordType.BEGIN, 1, 0, 0, b"x"))
    bad[-1] ^= 0x01
    (tmp_path / "wal-000004.log").write_bytes(bytes(bad) + encode_record(RecordType.BEGIN, 2, 0, 0))
    wal = WriteAheadLog(tmp_path, fsync=False)
    record = wal.append(RecordType.BEGIN, 3, 0, 0)
    wal.close()
    assert record.segment == "wal-000005.log"
    assert wal.recovered_events == [
        "wal-000004.log corrupt record at offset 0: record CRC32 mismatch; new records go to wal-000005.log"]


def test_reopening_a_log_whose_last_segment_is_unreadable_keeps_it_and_writes_to_the_next(tmp_path: Path) -> None:
    outside = tmp_path / "outside.log"
    outside.write_bytes(encode_record(RecordType.BEGIN, 1, 0, 0))
    directory = tmp_path / "wal"
    directory.mkdir()
    (directory / "wal-000001.log").symlink_to(outside)
    wal = WriteAheadLog(directory, fsync=False)
    wal.close()
    assert wal.active_segment == "wal-000002.log"
    assert len(wal.recovered_events) == 1
    assert wal.recovered_events[0].startswith("wal-000001.log corrupt record at offset 0: not read: ")
    assert wal.recovered_events[0].endswith("; new records go to wal-000002.log")
    result = replay(directory)
    assert [(c.segment, c.offset) for c in result.corruptions] == [("wal-000001.log", 0)]
    assert result.torn == [] and len(result.events) == 1


# ---------------------------------------------------------------- pruning


def _three_segments(directory: Path, *, fsync: bool = False) -> WriteAheadLog:
    wal = WriteAheadLog(directory, max_bytes=_frame(), fsync=fsync)
    for txn in (1, 2, 3):
        wal.append(RecordType.BEGIN, txn, 0, 0, b"p")
    return wal


def test_prune_removes_old_segments_past_evidence_and_says_which(tmp_path: Path) -> None:
    wal = _three_segments(tmp_path)
    bad = bytearray((tmp_path / "wal-000001.log").read_bytes())
    bad[-1] ^= 0x01
    (tmp_path / "wal-000001.log").write_bytes(bytes(bad))  # corrupt: evidence, kept
    assert wal.prune(keep_from_txn=3) == ["wal-000002.log"]
    assert [p.name for p in wal.segments()] == ["wal-000001.log", "wal-000003.log"]
    wal.close()


def test_prune_skips_an_unreadable_segment_and_prunes_the_ones_after_it(tmp_path: Path) -> None:
    directory = tmp_path / "wal"
    wal = _three_segments(directory)
    outside = tmp_path / "outside.log"
    (directory / "wal-000001.log").rename(outside)
    (directory / "wal-000001.log").symlink_to(outside)
    assert wal.prune(keep_from_txn=3) == ["wal-000002.log"]
    assert outside.exists()
    wal.close()


def test_prune_with_fsync_makes_the_removal_durable(tmp_path: Path) -> None:
    wal = _three_segments(tmp_path, fsync=True)
    assert wal.prune(keep_from_txn=3) == ["wal-000001.log", "wal-000002.log"]
    wal.close()


def test_without_o_dsync_every_append_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(wal_module, "_HAS_DSYNC", False)
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    wal = WriteAheadLog(tmp_path / "durable")
    synced.clear()  # the directory fsync of the new segment
    wal.append(RecordType.BEGIN, 1, 0, 0)
    wal.append(RecordType.COMMIT, 1, 0, 0)
    assert len(synced) == 2
    wal.close()
    quick = WriteAheadLog(tmp_path / "quick", fsync=False)
    synced.clear()
    quick.append(RecordType.BEGIN, 1, 0, 0)
    quick.close()
    assert synced == []


@pytest.mark.skipif(not hasattr(os, "O_DSYNC"), reason="the platform has no O_DSYNC")
def test_with_o_dsync_an_append_costs_one_synced_write_and_no_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    wal = WriteAheadLog(tmp_path)
    synced.clear()
    wal.append(RecordType.BEGIN, 1, 0, 0)
    wal.close()
    assert synced == []


def test_header_layout_is_the_documented_44_bytes() -> None:
    assert HEADER_SIZE == 44 and struct.calcsize("<4sHHQQQII") == 40


def test_a_wal_whose_segment_is_given_descriptor_0_works(tmp_path: Path) -> None:
    # A daemon may run with stdin closed: then the segment's descriptor is 0, a valid open file.
    # Here first (the reference, and what ties this test to append and close for mutmut), then
    # in a child whose stdin is closed.
    here = WriteAheadLog(tmp_path / "here", fsync=False)
    here.append(RecordType.BEGIN, 1, 0, 0, b"on fd 0")
    here.close()
    with pytest.raises(ValueError, match="is closed"):
        here.append(RecordType.BEGIN, 2, 0, 0)
    code = (
        "import os, sys\n"
        "from esper.tolaria.checkpoint.wal import RecordType, WriteAheadLog, replay\n"
        "os.close(0)\n"
        "wal = WriteAheadLog(sys.argv[1], fsync=False)\n"
        "assert wal._fd == 0, wal._fd\n"
        "wal.append(RecordType.BEGIN, 1, 0, 0, b'on fd 0')\n"
        "wal.close()\n"
        "assert os.open(os.devnull, os.O_RDONLY) == 0  # close() released descriptor 0\n"
        "print([r.payload for r in replay(sys.argv[1]).records])\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "child")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[b'on fd 0']"
