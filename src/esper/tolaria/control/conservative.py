"""Conservative mode: what Tolaria gives up while any breaker is not CLOSED, and how it leaves.

While conservative:
- **No germination.** A GERMINATE command is replaced by a recorded no-op; commands that advance,
  fossilize or cull existing seeds still apply, so live seeds can finish or be removed.
- **Tamiyo gets a shorter leash.** Its deadline is multiplied by `tamiyo_timeout_factor` (0.5 by
  default), so a struggling controller costs less per epoch; while the Tamiyo breaker is OPEN the
  controller is skipped and the fallback command is used until the half-open probe. The leash
  bounds the wait, never the verdict: the half-open probe gets the full deadline (it decides
  whether the controller recovered), and an answer that misses only the shorter deadline is a
  "late" fallback that is not charged to the breaker. Otherwise a controller that meets its
  normal deadline could never close its breaker, and this mode could never be left.
- **Per-seed telemetry is reduced** to the aggregate metrics (seed counts, not one metric per seed).
- The flag is visible in every `SystemStatePacket` (field 50, `conservative_mode`), in telemetry
  events `conservative_mode_entered` / `conservative_mode_exited`, and in `summary.json`.

Exit rule: all breakers CLOSED for `healthy_epochs_to_exit` consecutive epoch boundaries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ConservativeMode:
    healthy_epochs_to_exit: int = 2
    active: bool = False
    healthy_streak: int = 0
    entered: int = 0
    exited: int = 0
    epochs: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def update(self, epoch: int, open_breakers: list[str], reasons: list[str]) -> str | None:
        """Decide once per boundary; returns "entered", "exited" or None."""
        if open_breakers:
            self.healthy_streak = 0
            if not self.active:
                self.active = True
                self.entered += 1
                self.reasons.append(f"epoch {epoch}: breaker(s) {', '.join(open_breakers)} open: {'; '.join(reasons)}")
                self.epochs.append(epoch)
                return "entered"
            self.epochs.append(epoch)
            return None
        if not self.active:
            return None
        self.healthy_streak += 1
        if self.healthy_streak >= self.healthy_epochs_to_exit:
            self.active = False
            self.exited += 1
            self.healthy_streak = 0
            return "exited"
        self.epochs.append(epoch)
        return None

    def summary(self) -> dict[str, Any]:
        return {"active": self.active, "epochs": list(self.epochs), "reasons": list(self.reasons),
                "entered": self.entered, "exited": self.exited}

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "healthy_streak": self.healthy_streak, "entered": self.entered,
                "exited": self.exited, "epochs": list(self.epochs), "reasons": list(self.reasons)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, list(value) if isinstance(value, list) else value)
