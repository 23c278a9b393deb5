"""De-duplication of at-least-once deliveries by their `attributes["event_id"]`."""

from __future__ import annotations

import threading
from collections import OrderedDict


class Deduplicator:
    """A bounded LRU of seen event ids.

    `seen(event_id)` answers whether the id was already seen and records it; once `capacity` ids
    are held the least recently seen is forgotten. Thread-safe."""

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError(f"Deduplicator capacity={capacity} must be >= 1")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self.duplicates = 0

    def seen(self, event_id: str) -> bool:
        """True (a duplicate) when `event_id` was seen before; records it either way.
        An empty id is never a duplicate: there is nothing to compare."""
        if not event_id:
            return False
        with self._lock:
            if event_id in self._ids:
                self._ids.move_to_end(event_id)
                self.duplicates += 1
                return True
            self._ids[event_id] = None
            if len(self._ids) > self.capacity:
                self._ids.popitem(last=False)
            return False

    def __contains__(self, event_id: object) -> bool:
        """Whether `event_id` was recorded, without recording it (for consumers that record only
        after they succeeded, so a failed attempt can be retried)."""
        with self._lock:
            return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)
