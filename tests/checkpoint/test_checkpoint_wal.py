"""WAL framing: round trip, torn tails at every offset, bit flips, rotation and pruning."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.tolaria.checkpoint.wal import (
    HEADER_SIZE,
    RecordType,
    WalCorruptionError,
    WriteAheadLog,
    encode_record,
    replay,
    scan_segment,
)


def _write(tmp_path: Path, n: int = 3, **kwargs: object) -> WriteAheadLog:
    wal = WriteAheadLog(tmp_path, fsync=False, **kwargs)  # type: ignore[arg-type]
    for i in range(n):
        wal.append(RecordType.BEGIN, i + 1, i, 10 * i, f"ckpt-{i}".encode())
        wal.append(RecordType.COMMIT, i + 1, i, 10 * i, b"payload-%d" % i)
    return wal


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    wal = _write(tmp_path, 2)
    wal.append(RecordType.COMMAND, 2, 7, 99, b"\x00\x01command")
    wal.append(RecordType.ABORT, 3, 8, 100)
    wal.close()
    result = replay(tmp_path)
    assert result.events == []
    got = [(r.type, r.txn_id, r.epoch, r.step, r.payload) for r in result.records]
    assert got == [
        (RecordType.BEGIN, 1, 0, 0, b"ckpt-0"), (RecordType.COMMIT, 1, 0, 0, b"payload-0"),
        (RecordType.BEGIN, 2, 1, 10, b"ckpt-1"), (RecordType.COMMIT, 2, 1, 10, b"payload-1"),
        (RecordType.COMMAND, 2, 7, 99, b"\x00\x01command"), (RecordType.ABORT, 3, 8, 100, b""),
    ]
    assert result.records[1].offset == HEADER_SIZE + len(b"ckpt-0")


def test_torn_tail_at_every_offset_of_last_record_is_end_of_log(tmp_path: Path) -> None:
    body = encode_record(RecordType.BEGIN, 1, 0, 0, b"first") + encode_record(RecordType.COMMIT, 1, 0, 0, b"ok")
    last = encode_record(RecordType.COMMIT, 2, 1, 10, b"last-record-payload")
    for cut in range(len(last)):
        records, corruption, torn = scan_segment(body + last[:cut], "wal-000001.log")
        assert corruption is None, cut
        assert [r.txn_id for r in records] == [1, 1], cut
        assert (torn is None) == (cut == 0), cut
        if torn is not None:
            assert torn.offset == len(body)


def test_writer_truncates_torn_tail_and_appends_after_it(tmp_path: Path) -> None:
    _write(tmp_path, 2).close()
    segment = tmp_path / "wal-000001.log"
    whole = segment.read_bytes()
    segment.write_bytes(whole[:-3])
    wal = WriteAheadLog(tmp_path, fsync=False)
    assert any("torn tail" in e and "truncated" in e for e in wal.recovered_events)
    wal.append(RecordType.COMMIT, 9, 9, 90, b"after")
    wal.close()
    result = replay(tmp_path)
    assert result.events == []
    assert [r.txn_id for r in result.records] == [1, 1, 2, 9]


def test_zero_filled_tail_is_a_torn_tail(tmp_path: Path) -> None:
    _write(tmp_path, 1).close()
    segment = tmp_path / "wal-000001.log"
    segment.write_bytes(segment.read_bytes() + bytes(100))
    result = replay(tmp_path)
    assert result.corruptions == [] and len(result.torn) == 1
    assert len(result.records) == 2


def test_every_flipped_bit_in_a_middle_record_is_reported_as_corruption(tmp_path: Path) -> None:
    first = encode_record(RecordType.BEGIN, 1, 0, 0, b"abc")
    middle = encode_record(RecordType.COMMIT, 1, 0, 0, b"payload")
    last = encode_record(RecordType.BEGIN, 2, 1, 10, b"x")
    for byte in range(len(middle)):
        for bit in (0, 7):
            damaged = bytearray(middle)
            damaged[byte] ^= 1 << bit
            records, corruption, _ = scan_segment(first + bytes(damaged) + last, "wal-000001.log")
            assert corruption is not None, (byte, bit)
            assert corruption.offset == len(first)
            assert [r.txn_id for r in records] == [1]


def test_flipped_bit_in_last_record_is_corruption_not_torn_tail(tmp_path: Path) -> None:
    _write(tmp_path, 2).close()
    segment = tmp_path / "wal-000001.log"
    data = bytearray(segment.read_bytes())
    data[-HEADER_SIZE - 2] ^= 0x10  # inside the last record's header (its length field region)
    segment.write_bytes(bytes(data))
    result = replay(tmp_path)
    assert len(result.corruptions) == 1 and result.torn == []
    assert "wal-000001.log corrupt record at offset" in result.events[0]
    with pytest.raises(WalCorruptionError, match="wal-000001.log corrupt record"):
        replay(tmp_path, strict=True)


def test_writer_on_corrupt_log_starts_new_segment_and_keeps_evidence(tmp_path: Path) -> None:
    _write(tmp_path, 2).close()
    segment = tmp_path / "wal-000001.log"
    data = bytearray(segment.read_bytes())
    data[HEADER_SIZE + 2] ^= 0x01
    segment.write_bytes(bytes(data))
    wal = WriteAheadLog(tmp_path, fsync=False)
    wal.append(RecordType.COMMIT, 5, 5, 50, b"new")
    wal.close()
    assert segment.read_bytes() == bytes(data)
    result = replay(tmp_path)
    assert [r.txn_id for r in result.records if r.segment == "wal-000002.log"] == [5]
    assert len(result.corruptions) == 1


def test_rotation_by_size_and_prune_keeps_needed_segments(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, fsync=False, max_bytes=200)
    for txn in range(1, 11):
        wal.append(RecordType.BEGIN, txn, txn, txn, b"b" * 40)
        wal.append(RecordType.COMMIT, txn, txn, txn, b"c" * 40)
    names = [p.name for p in wal.segments()]
    assert len(names) > 3 and names[0] == "wal-000001.log"
    assert all(p.stat().st_size <= 200 for p in wal.segments())
    removed = wal.prune(keep_from_txn=8)
    assert removed
    result = replay(tmp_path)
    kept_txns = {r.txn_id for r in result.records}
    assert {8, 9, 10} <= kept_txns and min(kept_txns) <= 8
    assert wal.active_segment in [p.name for p in wal.segments()]
    wal.close()
