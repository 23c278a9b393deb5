"""Step and boundary monitors: each turns one kind of fault into an `Incident` at its level.

| monitor          | fault                                              | level    |
| ---------------- | -------------------------------------------------- | -------- |
| LossMonitor      | NaN/Inf loss; loss > spike_factor x running baseline | SEVERE |
| GradientMonitor  | non-finite gradients (flag or total norm)          | SEVERE   |
| AccuracyMonitor  | validation accuracy collapse (drop vs best, floor) | MAJOR    |
| CollapseMonitor  | validation loss back near chance ln(classes)       | MAJOR    |
| TimingMonitor    | a phase over budget N times in a row               | MINOR    |
| Watchdog         | no step heartbeat for deadline_s (a hung step)     | CRITICAL |

Monitors take the plain numbers the trainer already has (the loss as a float, the aggregator's
finite flag and total norm): they never touch tensors, so they add no device syncs. Each keeps a
small state (`state_dict`/`load_state_dict`) so a rollback or resume restores what they learnt.
`observe` returns an `Incident` or None; what to do about it is `EmergencyProtocol`'s business.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from esper.tolaria.recovery.emergency import CRITICAL, MAJOR, MINOR, RESTORE_BEFORE_EPOCH, SEVERE, Incident

log = logging.getLogger(__name__)


class LossMonitor:
    """NaN/Inf loss, or a spike over `spike_factor` x an EMA baseline of healthy losses → SEVERE.

    The baseline is an exponential moving average (`ema_decay`) of losses that were *not*
    incidents; spikes never raise it. Spikes are judged only after `warmup_steps` healthy steps.
    `baseline_floor` keeps a near-zero baseline from turning noise into emergencies."""

    def __init__(self, spike_factor: float = 15.0, warmup_steps: int = 20, ema_decay: float = 0.9,
                 baseline_floor: float = 1e-3) -> None:
        if spike_factor <= 1:
            raise ValueError(f"LossMonitor spike_factor={spike_factor}: must exceed 1 (15 is the design default)")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"LossMonitor ema_decay={ema_decay}: choose 0 <= decay < 1")
        if warmup_steps < 1:
            raise ValueError(f"LossMonitor warmup_steps={warmup_steps}: need at least 1 step to form a baseline")
        self.spike_factor = spike_factor
        self.warmup_steps = warmup_steps
        self.ema_decay = ema_decay
        self.baseline_floor = baseline_floor
        self.baseline: float | None = None
        self.healthy_steps = 0

    def observe(self, loss: float, epoch: int, step: int) -> Incident | None:
        if not math.isfinite(loss):
            return Incident(SEVERE, "loss_nonfinite", f"training loss is {loss}", epoch, step, {"loss": str(loss)})
        if self.baseline is not None and self.healthy_steps >= self.warmup_steps:
            threshold = self.spike_factor * max(self.baseline, self.baseline_floor)
            if loss > threshold:
                return Incident(
                    SEVERE, "loss_spike",
                    f"loss {loss:.4g} exceeds {self.spike_factor:g}x its running baseline {self.baseline:.4g}",
                    epoch, step, {"loss": f"{loss:.6g}", "baseline": f"{self.baseline:.6g}"},
                )
        self.baseline = loss if self.baseline is None else self.ema_decay * self.baseline + (1 - self.ema_decay) * loss
        self.healthy_steps += 1
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "healthy_steps": self.healthy_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.baseline = state["baseline"]
        self.healthy_steps = int(state["healthy_steps"])


class GradientMonitor:
    """Non-finite gradients → SEVERE, from the aggregator's finite flag and total norm (no extra syncs)."""

    def __init__(self) -> None:
        self.nonfinite_total = 0

    def observe(self, finite: bool, total_norm: float, epoch: int, step: int) -> Incident | None:
        """Call on steps whose whole gradient was read (`AggregationStats.grad_checked`)."""
        if finite and math.isfinite(total_norm):
            return None
        self.nonfinite_total += 1
        return Incident(SEVERE, "grad_nonfinite", f"gradients are not finite (total norm {total_norm})",
                        epoch, step, {"grad_norm": str(total_norm)})

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_total": self.nonfinite_total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.nonfinite_total = int(state["nonfinite_total"])


class AccuracyMonitor:
    """Validation accuracy collapse → MAJOR.

    A collapse is accuracy more than `max_drop` (absolute, accuracy in [0, 1]) below the best seen,
    or below `floor` after having reached it, or non-finite. Collapsed epochs do not update the best."""

    def __init__(self, max_drop: float = 0.25, floor: float | None = None) -> None:
        if not 0 < max_drop <= 1:
            raise ValueError(f"AccuracyMonitor max_drop={max_drop}: give an absolute drop in (0, 1]")
        self.max_drop = max_drop
        self.floor = floor
        self.best: float | None = None

    def observe(self, accuracy: float, epoch: int, step: int) -> Incident | None:
        attrs = {"accuracy": f"{accuracy:.6g}", "best": f"{self.best:.6g}" if self.best is not None else ""}
        if not math.isfinite(accuracy):
            return Incident(MAJOR, "accuracy_nonfinite", f"validation accuracy is {accuracy}", epoch, step, attrs)
        if self.best is not None and self.best - accuracy > self.max_drop:
            return Incident(MAJOR, "accuracy_collapse",
                            f"validation accuracy {accuracy:.4f} fell {self.best - accuracy:.4f} below its best "
                            f"{self.best:.4f} (limit {self.max_drop})", epoch, step, attrs)
        if self.floor is not None and self.best is not None and self.best >= self.floor > accuracy:
            return Incident(MAJOR, "accuracy_floor",
                            f"validation accuracy {accuracy:.4f} fell below the floor {self.floor}", epoch, step, attrs)
        self.best = accuracy if self.best is None else max(self.best, accuracy)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state["best"]


class CollapseMonitor:
    """Validation loss back near chance after it was well below it → MAJOR (a mutation broke the model).

    Chance is the loss of a uniform guess, ln(classes) (`Validation.chance_loss`). The loss counts
    as collapsed at `fraction` x chance or above, or non-finite, once it was at `below` x chance or
    less; a task without a chance loss (regression) is never judged. `note` takes the boundary's
    validation, `observe` judges it at the boundary's monitors (the accuracy monitor's point).
    The response is a full rollback to the state before the previous boundary's command: boundary
    E's validation is the first to see what boundary E - 1 applied, and the newest checkpoint
    (boundary E - 1's) holds that mutation, so restoring it would train into the same collapse."""

    def __init__(self, fraction: float = 0.9, below: float = 0.5) -> None:
        if not 0 < below < fraction <= 1:
            raise ValueError(f"CollapseMonitor below={below}, fraction={fraction}: need 0 < below < fraction <= 1")
        self.fraction, self.below = fraction, below
        self.best_ratio: float | None = None  # the lowest val loss / chance seen
        self._pending: tuple[float, float] | None = None  # (val loss, chance) noted, not yet judged

    def note(self, val_loss: float, chance_loss: float | None) -> None:
        self._pending = (val_loss, chance_loss) if chance_loss is not None and chance_loss > 0 else None

    def observe(self, epoch: int, step: int) -> Incident | None:
        if self._pending is None:
            return None
        (loss, chance), self._pending = self._pending, None
        ratio = loss / chance if math.isfinite(loss) else math.inf
        best = self.best_ratio
        if best is not None and best <= self.below and ratio >= self.fraction:
            return Incident(MAJOR, "loss_collapse",
                            f"validation loss {loss:.4g} is back near chance ln(classes) = {chance:.4g} "
                            f"({ratio:.2f} of it; it was {best:.2f})", epoch, step,
                            {"val_loss": f"{loss:.6g}", "chance_loss": f"{chance:.6g}", "best_ratio": f"{best:.6g}",
                             RESTORE_BEFORE_EPOCH: str(epoch)})
        self.best_ratio = ratio if best is None else min(best, ratio)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"best_ratio": self.best_ratio}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_ratio = state["best_ratio"]
        self._pending = None


class TimingMonitor:
    """A timed phase (e.g. the epoch boundary) over budget `consecutive` times in a row → MINOR.

    Fires once per run of `consecutive` breaches, then counts afresh."""

    def __init__(self, budget_ms: float, consecutive: int = 3, phase: str = "boundary") -> None:
        if budget_ms <= 0 or consecutive < 1:
            raise ValueError(f"TimingMonitor budget_ms={budget_ms}, consecutive={consecutive}: both must be positive")
        self.budget_ms = budget_ms
        self.consecutive = consecutive
        self.phase = phase
        self.streak = 0
        self.over_total = 0

    def observe(self, duration_ms: float, epoch: int, step: int) -> Incident | None:
        if duration_ms <= self.budget_ms:
            self.streak = 0
            return None
        self.streak += 1
        self.over_total += 1
        if self.streak < self.consecutive:
            return None
        self.streak = 0
        return Incident(MINOR, f"{self.phase}_over_budget",
                        f"{self.phase} took {duration_ms:.1f} ms, over its {self.budget_ms:g} ms budget "
                        f"{self.consecutive} times in a row", epoch, step,
                        {"duration_ms": f"{duration_ms:.3f}", "budget_ms": f"{self.budget_ms:g}"})

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "over_total": self.over_total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.streak = int(state["streak"])
        self.over_total = int(state["over_total"])


class Watchdog:
    """No `heartbeat()` for `deadline_s` → a CRITICAL `Incident` passed to `on_timeout`.

    A daemon thread checks every `poll_s` (default: a quarter of the deadline, at most 0.5 s);
    `on_timeout` runs *on the watchdog thread*, once per stall: the watchdog re-arms at the next
    heartbeat. `heartbeat` is a single attribute store, cheap enough for every step. Call `pause()`
    around work that legitimately makes no step progress (a long validation, a checkpoint load)."""

    def __init__(self, deadline_s: float, on_timeout: Callable[[Incident], None], *, poll_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if deadline_s <= 0:
            raise ValueError(f"Watchdog deadline_s={deadline_s}: must be positive")
        self.deadline_s = deadline_s
        self.on_timeout = on_timeout
        self.poll_s = poll_s if poll_s is not None else min(deadline_s / 4, 0.5)
        self.clock = clock
        self.fired_total = 0
        self._beat: tuple[float, int, int] = (clock(), 0, 0)  # (time, epoch, step): one atomic store
        self._paused = False
        self._fired = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self.heartbeat()
            self._thread = threading.Thread(target=self._run, name="tolaria-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(1.0, 2 * self.poll_s))
        self._thread = None

    def heartbeat(self, epoch: int = 0, step: int = 0) -> None:
        self._beat = (self.clock(), epoch, step)
        self._fired = False

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self.heartbeat(*self._beat[1:])
        self._paused = False

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            at, epoch, step = self._beat
            silent = self.clock() - at
            if self._paused or self._fired or silent < self.deadline_s:
                continue
            self._fired = True
            self.fired_total += 1
            incident = Incident(CRITICAL, "step_hung",
                                f"no training-step heartbeat for {silent:.2f} s (deadline {self.deadline_s:g} s) "
                                f"after epoch {epoch} step {step}", epoch, step, {"silent_s": f"{silent:.3f}"})
            try:
                self.on_timeout(incident)
            except Exception:  # noqa: BLE001 - a background thread logs and carries on (STYLE 7)
                log.exception("watchdog on_timeout callback failed")

    def state_dict(self) -> dict[str, Any]:
        return {"fired_total": self.fired_total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.fired_total = int(state["fired_total"])


class MonitorSet:
    """The step and boundary monitors of one run, as one snapshot section ("monitors")."""

    def __init__(self, *, spike_factor: float, accuracy_drop: float, budget_ms: float,
                 collapse_fraction: float = 0.9, collapse_below: float = 0.5) -> None:
        self.loss = LossMonitor(spike_factor=spike_factor)
        self.grads = GradientMonitor()
        self.accuracy = AccuracyMonitor(max_drop=accuracy_drop)
        self.collapse = CollapseMonitor(fraction=collapse_fraction, below=collapse_below)
        self.timing = TimingMonitor(budget_ms=budget_ms)

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.state_dict(), "grads": self.grads.state_dict(),
                "accuracy": self.accuracy.state_dict(), "collapse": self.collapse.state_dict(),
                "timing": self.timing.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loss.load_state_dict(state["loss"])
        self.grads.load_state_dict(state["grads"])
        self.accuracy.load_state_dict(state["accuracy"])
        self.collapse.load_state_dict(state.get("collapse", {"best_ratio": None}))  # older snapshots lack it
        self.timing.load_state_dict(state["timing"])
