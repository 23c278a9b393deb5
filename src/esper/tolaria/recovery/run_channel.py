"""Which emergency channel a run uses: keyed by the run (its directory, else its id), never by the
config's name, since a sweep of one config on one machine runs many trainers at once."""

from __future__ import annotations

import hashlib
from pathlib import Path

from esper.tolaria.recovery.signal import ChannelBusyError, EmergencyChannel


def run_channel_key(run_dir: Path | None, run_id: str, rank: int) -> str:
    """The channel key of one rank of one run: a hash of the run directory's resolved path (so two
    runs of the same config in different directories never collide, and a supervisor can derive
    the key from the directory), or the run id where the run has no directory."""
    if run_dir is not None:
        digest = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        return f"run-{digest}-r{rank}"
    if not run_id:
        raise ValueError("a run without a run directory needs a run_id to key its emergency channel")
    return f"id-{run_id}-r{rank}"


def open_run_channel(run_dir: Path | None, run_id: str, rank: int) -> EmergencyChannel:
    """Create this rank's channel, keyed by the run (its directory, else its id), never by the
    config's name: a sweep of one config on one machine runs many trainers at once."""
    key = run_channel_key(run_dir, run_id, rank)
    try:
        return EmergencyChannel.create(key)
    except ChannelBusyError as exc:
        where = f"run directory {run_dir}" if run_dir is not None else f"run {run_id}"
        raise ValueError(f"{where} is in use by a live Tolaria process (pid {exc.owner_pid}, emergency "
                         f"channel {key}); wait for it to finish or give this run its own --run-dir") from None
