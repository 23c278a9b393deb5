"""Durable checkpoints: atomic files, a write-ahead log, the command journal, recovery, inspection.

Owns: what is on disk and whether it can be trusted. May import `state`, `esper.contracts` and
`esper.leyline`; never `loop`, `recovery`, `control` or `observe`.

    store = CheckpointStore(run_dir / "checkpoints", keep_last=3)
    future = store.save_async(snapshot)        # training thread pays only for the snapshot clone
    result = recover(run_dir / "checkpoints")  # newest committed, checksum-valid checkpoint + events
"""

from esper.tolaria.checkpoint.atomic import atomic_write_bytes, fsync_dir
from esper.tolaria.checkpoint.best import BEST, BestScore
from esper.tolaria.checkpoint.inspect import corrupt_latest, inspect, list_checkpoints
from esper.tolaria.checkpoint.layout import CheckpointStateError
from esper.tolaria.checkpoint.recovery import (
    CheckpointNotFound,
    LoadedCheckpoint,
    RecoveryResult,
    Verification,
    load_for_rollback,
    recover,
    verify_checkpoint,
)
from esper.tolaria.checkpoint.store import (
    CheckpointInfo,
    CheckpointStore,
    CheckpointSuperseded,
    CheckpointWriteError,
)
from esper.tolaria.checkpoint.wal import RecordType, WalCorruption, WalCorruptionError, WriteAheadLog, replay

__all__ = [
    "BEST",
    "BestScore",
    "CheckpointInfo",
    "CheckpointNotFound",
    "CheckpointStateError",
    "CheckpointStore",
    "CheckpointSuperseded",
    "CheckpointWriteError",
    "LoadedCheckpoint",
    "RecordType",
    "RecoveryResult",
    "Verification",
    "WalCorruption",
    "WalCorruptionError",
    "WriteAheadLog",
    "atomic_write_bytes",
    "corrupt_latest",
    "fsync_dir",
    "inspect",
    "list_checkpoints",
    "load_for_rollback",
    "recover",
    "replay",
    "verify_checkpoint",
]
