"""Circuit breakers (Leyline `CircuitBreakerState`): failures are recorded where they happen,
and one decision point opens, probes and closes.

The cool-down is counted in refused calls rather than seconds: Tolaria's breakers guard
per-epoch or per-step operations, so "skip the next N attempts, then probe" is the natural
clock, and it keeps runs deterministic and resumable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from esper.leyline import (
    CIRCUIT_STATE_CLOSED,
    CIRCUIT_STATE_HALF_OPEN,
    CIRCUIT_STATE_OPEN,
    CircuitBreakerState,
)


@dataclass
class CircuitBreaker:
    """CLOSED → (threshold consecutive failures) → OPEN → (cooldown refusals) → HALF_OPEN probe.

    A probe that succeeds closes the breaker; one that fails re-opens it. Callers ask `allow()`
    before the guarded operation and report `record_success()` / `record_failure(reason)` after.
    """

    name: str
    failure_threshold: int = 3
    cooldown_calls: int = 2
    state: int = CIRCUIT_STATE_CLOSED
    consecutive_failures: int = 0
    total_failures: int = 0
    times_opened: int = 0
    refused: int = 0
    last_reason: str = ""
    transitions: list[tuple[str, str]] = field(default_factory=list)

    @property
    def state_name(self) -> str:
        return CircuitBreakerState.Name(self.state).removeprefix("CIRCUIT_STATE_")  # type: ignore[arg-type]

    @property
    def is_closed(self) -> bool:
        return self.state == CIRCUIT_STATE_CLOSED

    def allow(self) -> bool:
        """May the guarded operation run now? While OPEN, counts the refusal toward the probe."""
        if self.state != CIRCUIT_STATE_OPEN:
            return True
        self.refused += 1
        if self.refused >= self.cooldown_calls:
            self._move(CIRCUIT_STATE_HALF_OPEN, "cool-down over: probing")
            return True
        return False

    def record_success(self) -> None:
        self.consecutive_failures = 0
        if self.state == CIRCUIT_STATE_HALF_OPEN:
            self._move(CIRCUIT_STATE_CLOSED, "probe succeeded")

    def record_failure(self, reason: str) -> bool:
        """Record one failure; returns True if this failure opened the breaker."""
        self.consecutive_failures += 1
        self.total_failures += 1
        self.last_reason = reason
        if self.state == CIRCUIT_STATE_HALF_OPEN or (
            self.state == CIRCUIT_STATE_CLOSED and self.consecutive_failures >= self.failure_threshold
        ):
            self.times_opened += 1
            self.refused = 0
            self._move(
                CIRCUIT_STATE_OPEN,
                f"{self.consecutive_failures} consecutive failures (threshold {self.failure_threshold}): {reason}",
            )
            return True
        return False

    def _move(self, state: int, why: str) -> None:
        self.transitions.append((CircuitBreakerState.Name(state), why))  # type: ignore[arg-type]
        del self.transitions[:-50]
        self.state = state

    def summary(self) -> dict[str, Any]:
        return {
            "state": self.state_name,
            "failures": self.total_failures,
            "opened": self.times_opened,
            "last_reason": self.last_reason,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "state": self.state, "consecutive_failures": self.consecutive_failures,
            "total_failures": self.total_failures, "times_opened": self.times_opened,
            "refused": self.refused, "last_reason": self.last_reason,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class BreakerBoard:
    """Tolaria's named breakers: boundary timing, Tamiyo, Kasmina, checkpoint, telemetry, LR."""

    NAMES = ("boundary_timing", "tamiyo", "kasmina", "checkpoint", "telemetry", "lr_controller")

    def __init__(self, *, failure_threshold: int = 3, cooldown_calls: int = 2) -> None:
        self.breakers = {
            n: CircuitBreaker(n, failure_threshold=failure_threshold, cooldown_calls=cooldown_calls)
            for n in self.NAMES
        }

    def __getitem__(self, name: str) -> CircuitBreaker:
        return self.breakers[name]

    def open_names(self) -> list[str]:
        return [n for n, b in self.breakers.items() if not b.is_closed]

    def summary(self) -> dict[str, dict[str, Any]]:
        return {n: b.summary() for n, b in self.breakers.items()}

    def state_dict(self) -> dict[str, Any]:
        return {n: b.state_dict() for n, b in self.breakers.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, values in state.items():
            self.breakers[name].load_state_dict(values)
