"""The registry of stateful components: what a snapshot holds, and the order it is restored in.

Every component whose state must survive a rollback or a resume registers once, at wiring, under
a stable key (the snapshot's section name). Capture reads every section in registration order;
restore writes them back in the same order, so the order is part of the contract: structure
(Kasmina) before weights, weights before the optimizer, the optimizer before the LR controller.
A component added later joins every snapshot and checkpoint by registering.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from esper.contracts import StatefulComponent
from esper.tolaria.state.snapshot import Snapshot, deep_clone


@runtime_checkable
class Rewindable(Protocol):
    """A component that a rollback restores differently from a resume: it goes back to the saved
    state but keeps what the abandoned stretch taught (incident records, batches to skip)."""

    def rewind_to(self, state: Any) -> None: ...


@dataclass(frozen=True)
class _Entry:
    save: Callable[[], Any]
    load: Callable[[Any], None]
    rewind: Callable[[Any], None]


def _nothing() -> None:
    return None


def _ignore(_state: Any) -> None:
    return None


class StateRegistry:
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def register(self, key: str, component: StatefulComponent | None) -> None:
        """Add `component` under `key`. None keeps the section in every snapshot with no state
        (an optional component this run lacks), so a snapshot's sections do not depend on it."""
        if key in self._entries:
            raise ValueError(f"state section {key!r} is registered twice")
        if component is None:
            self._entries[key] = _Entry(_nothing, _ignore, _ignore)
            return
        if not isinstance(component, StatefulComponent):
            raise TypeError(f"state section {key!r}: {type(component).__name__} has no state_dict/load_state_dict")
        rewind = component.rewind_to if isinstance(component, Rewindable) else component.load_state_dict
        self._entries[key] = _Entry(component.state_dict, component.load_state_dict, rewind)

    def keys(self) -> list[str]:
        return list(self._entries)

    def live_state(self) -> dict[str, Any]:
        """Every section holding the *live* tensors: clone (or copy behind) before keeping it."""
        return {key: entry.save() for key, entry in self._entries.items()}

    def capture(self) -> dict[str, Any]:
        """Every section, tensors cloned: later training never changes it."""
        return deep_clone(self.live_state())  # type: ignore[no-any-return]

    def snapshot(self, snapshot_id: str, epoch: int, global_step: int) -> Snapshot:
        return Snapshot(snapshot_id=snapshot_id, epoch=epoch, global_step=global_step, state=self.capture())

    def restore(self, state: Mapping[str, Any], *, rewind: bool, skip: Collection[str] = ()) -> None:
        """Make every registered component's state that of `state`, in registration order.

        `rewind`: a rollback (components that keep records keep them); otherwise a resume, which
        restores exactly. Sections in `skip`, missing from `state` or without state are left alone
        (a fast rollback has already copied the tensors in place and restores only the rest)."""
        for key, entry in self._entries.items():
            if key in skip or state.get(key) is None:
                continue
            (entry.rewind if rewind else entry.load)(state[key])
