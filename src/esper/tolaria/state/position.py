"""Where the run stands: the counters every component that needs to know reads from one object."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainerState:
    """Counters that locate the run; everything else is derived or lives in a component."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0

    @property
    def snapshot_id(self) -> str:
        """The id of a snapshot taken here."""
        return f"e{self.epoch:04d}-s{self.global_step:08d}"


@dataclass
class RunIdentity:
    """Which run this is. A resume from the run's own checkpoints adopts the saved `run_id`."""

    run_id: str
    name: str  # the experiment name (config run.name)
    config_sha256: str


@dataclass
class StopRequest:
    """Why the run should leave `fit()` after the current step (a signal, a halt), if it should."""

    reason: str | None = None

    def request(self, reason: str) -> None:
        self.reason = reason

    @property
    def requested(self) -> bool:
        return self.reason is not None
