"""The order of durable effects: what is written, fsynced, renamed and committed before what.

A recording shim over `os.open`, `os.fsync`, `os.replace`, `os.rename` and the WAL append logs
each effect with the path it touched, so a test can say "the data is fsynced before the rename
that publishes it" and "the COMMIT record follows the fsync of the directory it names".
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from ckpt_helpers import make_snapshot

from esper.tolaria.checkpoint import CheckpointStore, RecordType, WriteAheadLog, recover
from esper.tolaria.checkpoint.atomic import atomic_write_bytes, fsync_dir
from esper.tolaria.checkpoint.wal import replay


class Recorder:
    """Effects in the order they happened: ("fsync", path), ("replace", src, dst), ("wal", "BEGIN")..."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.effects: list[tuple[str, ...]] = []
        self.open_flags: dict[str, int] = {}
        self._paths: dict[int, str] = {}

    def name(self, path: str | os.PathLike[str]) -> str:
        """A path relative to the test's directory; staging and temp names are kept as they are."""
        resolved = Path(os.path.abspath(path))
        return "." if resolved == self.root else str(resolved.relative_to(self.root))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_open, real_fsync, real_replace, real_rename = os.open, os.fsync, os.replace, os.rename
        real_append = WriteAheadLog.append

        def open_(path: str | os.PathLike[str], flags: int, *args: object, **kwargs: object) -> int:
            fd = real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]
            if self._inside(path):
                self._paths[fd] = self.name(path)
                self.open_flags[self.name(path)] = flags
            return fd

        def fsync(fd: int) -> None:
            real_fsync(fd)
            if fd in self._paths:
                self.effects.append(("fsync", self._paths[fd]))

        def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str], **kwargs: object) -> None:
            real_replace(src, dst, **kwargs)  # type: ignore[arg-type]
            self.effects.append(("replace", self.name(src), self.name(dst)))

        def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str], **kwargs: object) -> None:
            real_rename(src, dst, **kwargs)  # type: ignore[arg-type]
            self.effects.append(("rename", self.name(src), self.name(dst)))

        def append(wal: WriteAheadLog, rtype: RecordType, *args: object, **kwargs: object) -> object:
            record = real_append(wal, rtype, *args, **kwargs)  # type: ignore[arg-type]
            self.effects.append(("wal", rtype.name))  # durable on return: that is when it counts
            return record

        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(WriteAheadLog, "append", append)

    def _inside(self, path: str | os.PathLike[str]) -> bool:
        return Path(os.path.abspath(path)).is_relative_to(self.root)

    def index(self, effect: tuple[str, ...]) -> int:
        assert effect in self.effects, (effect, self.effects)
        return self.effects.index(effect)


@pytest.fixture
def recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    rec = Recorder(tmp_path.resolve())
    rec.install(monkeypatch)
    yield rec


def _temp_of(effects: list[tuple[str, ...]], target: str) -> str:
    """The temp file that was renamed onto `target`."""
    (src,) = [e[1] for e in effects if e[0] == "replace" and e[2] == target]
    return src


# ---------------------------------------------------------------- atomic files


def test_an_atomic_write_fsyncs_its_data_before_the_rename_and_the_directory_after(
    tmp_path: Path, recorder: Recorder
) -> None:
    atomic_write_bytes(tmp_path / "f.bin", b"payload")  # the defaults are the durable ones
    tmp = _temp_of(recorder.effects, "f.bin")
    assert recorder.effects == [("fsync", tmp), ("replace", tmp, "f.bin"), ("fsync", ".")]
    assert recorder.open_flags["."] & os.O_DIRECTORY  # the directory itself, not something at its path


def test_an_atomic_write_calls_each_crash_point_just_before_its_durable_step(
    tmp_path: Path, recorder: Recorder
) -> None:
    def crash_point(label: str) -> None:
        recorder.effects.append(("crash", label))

    atomic_write_bytes(tmp_path / "f.bin", b"payload", crash_point=crash_point)
    tmp = _temp_of(recorder.effects, "f.bin")
    assert recorder.effects == [
        ("crash", "write"), ("crash", "fsync"), ("fsync", tmp), ("crash", "rename"), ("replace", tmp, "f.bin"),
        ("crash", "fsync-dir"), ("fsync", "."),
    ]


def test_an_atomic_write_without_fsync_still_replaces_atomically_but_syncs_nothing(
    tmp_path: Path, recorder: Recorder
) -> None:
    atomic_write_bytes(tmp_path / "f.bin", b"payload", fsync=False)
    assert [e[0] for e in recorder.effects] == ["replace"]
    assert (tmp_path / "f.bin").read_bytes() == b"payload"


def test_an_atomic_write_keeps_writing_after_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))  # a slow pipe, a full disk
    atomic_write_bytes(tmp_path / "f.bin", b"0123456789abcdef", fsync=False)
    assert (tmp_path / "f.bin").read_bytes() == b"0123456789abcdef"


def test_an_atomic_write_creates_files_owner_writable_and_never_executable(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f.bin", b"x", fsync=False)
    finally:
        os.umask(previous)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644


def test_fsync_dir_refuses_a_path_that_is_not_a_directory(tmp_path: Path) -> None:
    # fsyncing a file instead of its directory would leave the rename itself undurable, silently
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "f.bin")


# ---------------------------------------------------------------- the checkpoint commit


def _saved_twice(tmp_path: Path, recorder: Recorder, **kwargs: object) -> list[tuple[str, ...]]:
    """The effects of the second save into a store that keeps one checkpoint (so it retires the first)."""
    store = CheckpointStore(tmp_path / "ck", keep_last=1, **kwargs)  # type: ignore[arg-type]
    store.save(make_snapshot(10))
    recorder.effects.clear()
    store.save(make_snapshot(20))
    store.close()
    return list(recorder.effects)


def test_a_checkpoint_commits_only_after_its_files_and_both_directories_are_durable(
    tmp_path: Path, recorder: Recorder
) -> None:
    effects = _saved_twice(tmp_path, recorder)
    staging, final = "ck/.ckpt-000000000020.2.tmp", "ck/ckpt-000000000020"
    assert recorder.open_flags["ck/wal-000001.log"] & getattr(os, "O_DSYNC", 0)  # its WAL records are durable
    assert effects[0] == ("wal", "BEGIN")  # nothing touches the disk before the transaction is open
    publish = recorder.index(("rename", staging, final))
    replaced = {}
    for file_name in ("model.pt", "state.pt", "manifest.pb"):
        tmp = _temp_of(effects, f"{staging}/{file_name}")
        replaced[file_name] = recorder.index(("replace", tmp, f"{staging}/{file_name}"))
        assert recorder.index(("fsync", tmp)) < replaced[file_name]  # data durable before its name
        synced = [i for i, e in enumerate(effects) if e == ("fsync", staging) and i > replaced[file_name]]
        assert synced and synced[0] < publish, file_name  # its directory entry durable before the publish
    assert replaced["manifest.pb"] > max(replaced["model.pt"], replaced["state.pt"])  # the manifest vouches last
    commit = recorder.index(("wal", "COMMIT"))
    root_synced = [i for i, e in enumerate(effects) if e == ("fsync", "ck") and publish < i < commit]
    assert root_synced, effects  # the rename is durable before the COMMIT that names it
    retire = recorder.index(("rename", "ck/ckpt-000000000010", "ck/.ckpt-000000000010.retired-1.tmp"))
    assert commit < retire  # the superseded checkpoint is touched only once its successor is durable
    assert effects[-1] == ("fsync", "ck")  # and its removal is made durable too
    assert not any(e[0] == "wal" and e[1] not in ("BEGIN", "COMMIT") for e in effects)


def test_a_store_without_fsync_syncs_nothing_but_commits_in_the_same_order(tmp_path: Path, recorder: Recorder) -> None:
    effects = _saved_twice(tmp_path, recorder, fsync=False)
    assert not any(e[0] == "fsync" for e in effects)
    assert not recorder.open_flags["ck/wal-000001.log"] & getattr(os, "O_DSYNC", 0)  # nor its WAL
    kinds = [e[0] if e[0] != "wal" else e[1] for e in effects]
    assert kinds == ["BEGIN", "replace", "replace", "replace", "rename", "COMMIT", "rename"]


def test_the_commit_sequence_offers_a_crash_point_before_every_durable_step(tmp_path: Path) -> None:
    labels: list[str] = []
    store = CheckpointStore(tmp_path / "ck", keep_last=1)
    store.save(make_snapshot(10))
    store.crash_point = labels.append
    store.save(make_snapshot(20))
    store.close()
    staging, name, trash = ".ckpt-000000000020.2.tmp", "ckpt-000000000020", ".ckpt-000000000010.retired-1.tmp"
    per_file = [f"{step} {f}" for f in ("model.pt", "state.pt", "manifest.pb")
                for step in ("write", "fsync", "rename", "fsync-dir")]
    assert labels == [
        "wal-append BEGIN", *per_file, "fsync-dir staging", f"rename {staging} -> {name}", "fsync-dir root",
        "wal-append COMMIT", f"rename ckpt-000000000010 -> {trash}", f"remove {trash}",
    ]


def test_a_commit_record_names_the_published_checkpoint_and_its_manifest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ck", keep_last=2)
    info = store.save(make_snapshot(20))
    store.close()
    records = replay(tmp_path / "ck").records
    assert [(r.type, r.txn_id, r.step) for r in records] == [(RecordType.BEGIN, 1, 20), (RecordType.COMMIT, 1, 20)]
    assert records[0].payload == info.name.encode()
    result = recover(tmp_path / "ck")
    assert result.checkpoint is not None and result.checkpoint.name == info.name


# ---------------------------------------------------------------- the write-ahead log


def test_a_wal_append_is_durable_on_return(tmp_path: Path, recorder: Recorder) -> None:
    wal = WriteAheadLog(tmp_path / "wal")
    wal.append(RecordType.BEGIN, 1, 0, 0, b"x")
    wal.close()
    flags = recorder.open_flags["wal/wal-000001.log"]
    # O_DSYNC makes each write durable before it returns; without it every record is fsynced
    synced = [e for e in recorder.effects if e == ("fsync", "wal/wal-000001.log")]
    assert flags & getattr(os, "O_DSYNC", 0) or synced
    assert flags & os.O_APPEND and not flags & os.O_TRUNC
    assert ("fsync", "wal") in recorder.effects  # a new segment's directory entry is durable too


def test_a_wal_without_fsync_opens_its_segment_without_o_dsync(tmp_path: Path, recorder: Recorder) -> None:
    WriteAheadLog(tmp_path / "wal", fsync=False).close()
    assert not recorder.open_flags["wal/wal-000001.log"] & getattr(os, "O_DSYNC", 0)
    assert not any(e[0] == "fsync" for e in recorder.effects)
