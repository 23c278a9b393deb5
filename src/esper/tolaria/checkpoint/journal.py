"""The command journal: every command Tolaria applies is in the WAL before it takes effect.

`record` journals a command durably before it is applied; a rollback journals a REWIND that
retires the commands of the abandoned history. On resume, `replay` loads the commands journaled
after the restored checkpoint, and the boundaries they were first applied at apply them again:
up to the last journaled boundary the journal, not Tamiyo, decides what is applied.
"""

from __future__ import annotations

from collections.abc import Sequence

from esper.contracts import EventSink
from esper.leyline import TELEMETRY_LEVEL_ERROR, AdaptationCommand, LeylineError, parse
from esper.tolaria.checkpoint.store import CheckpointStore
from esper.tolaria.checkpoint.wal import WalRecord


class CommandJournal:
    def __init__(self, store: CheckpointStore | None, events: EventSink) -> None:
        self._store = store  # None: checkpoints are off (or another rank writes them)
        self._events = events
        self._replay: dict[int, AdaptationCommand] = {}  # global step -> command to replay there
        self._until = -1  # the last journaled boundary's step: up to it, the journal decides

    # ---------------------------------------------------------------- writing
    def record(self, command: AdaptationCommand, *, epoch: int, step: int) -> None:
        """Journal `command` durably before it is applied."""
        if self._store is None:
            return
        try:
            self._store.journal_command(command, epoch=epoch, step=step)
        except (OSError, ValueError) as exc:  # the WAL is full or closed: apply anyway, but say resume may differ
            self._events("command_journal_failed", TELEMETRY_LEVEL_ERROR, command_id=command.command_id,
                         error=str(exc), consequence="a resume before the next checkpoint may not replay it")

    def rewind(self, *, step: int, epoch: int, reason: str) -> None:
        """Training went back to `step`: later journaled commands belong to an abandoned history."""
        self.forget()
        if self._store is None:
            return
        try:
            self._store.journal_rewind(epoch=epoch, step=step, reason=reason)
        except (OSError, ValueError) as exc:
            self._events("command_journal_failed", TELEMETRY_LEVEL_ERROR, error=str(exc),
                         consequence="a resume before the next checkpoint may replay an abandoned command")

    # ---------------------------------------------------------------- replaying
    def replay(self, records: Sequence[WalRecord]) -> None:
        """Commands journaled after the restored checkpoint (see `recover`), replayed at their steps."""
        self.forget()
        for rec in records:
            try:
                self._replay[rec.step] = parse(AdaptationCommand, rec.payload)
            except LeylineError as exc:
                self._events("journal_command_unreadable", TELEMETRY_LEVEL_ERROR, step=rec.step, error=str(exc))
                continue
            self._until = max(self._until, rec.step)

    def forget(self) -> None:
        """After a rollback Tamiyo decides again: the journaled future is no longer this history's."""
        self._replay, self._until = {}, -1

    def replaying(self, step: int) -> bool:
        """Whether the interrupted run already passed the boundary at `step`."""
        return step <= self._until

    def take(self, step: int) -> AdaptationCommand | None:
        """The command the interrupted run applied at `step` (None: it applied none). The last
        replayed boundary ends the replay: Tamiyo decides from the next one."""
        command = self._replay.pop(step, None)
        if step >= self._until:
            self.forget()
        return command
