"""Fault drills: `tolaria run --inject KIND@epoch=N[,step=M]` rehearses a failure on purpose.

Drills wrap the component they break (a Tamiyo that hangs, a Kasmina that raises, a store
whose disk is full) or act at a named point of the loop; the trainer itself has no drill
branches beyond asking `plan.due(kind, epoch, step)` at those points. Each drill's outcome is
recorded in the run summary's `drills` list.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from esper.leyline import AdaptationCommand, SystemStatePacket

DRILLS: dict[str, str] = {
    "tamiyo-hang": "Tamiyo never answers this epoch: the handshake deadline expires, the fallback is used",
    "tamiyo-raise": "Tamiyo raises this epoch: the error is recorded, the fallback is used",
    "tamiyo-garbage": "Tamiyo answers with a malformed command: verification rejects it, the fallback is used",
    "tamiyo-forged-command": "Tamiyo's command carries a forged signature: verification rejects it",
    "kasmina-raise": "Kasmina raises while applying this epoch's command: recorded, escalated, model unchanged",
    "slow-boundary": "the boundary check phase overruns its budget for `breaker threshold` epochs from N",
    "lr-tamper": "an out-of-band write to param_group['lr'] at this step: detected and reverted next step",
    "disk-full": "the checkpoint write at this epoch fails with ENOSPC: previous checkpoints intact, run goes on",
    "corrupt-checkpoint": "the newest checkpoint is corrupted after this epoch: recovery falls back to the previous",
    "nan-loss": "the loss at this step is NaN: SEVERE, fast rollback",
    "nan-grad": "a gradient at this step is NaN: SEVERE, fast rollback",
    "loss-spike": "the loss at this step is x20 its baseline: SEVERE, rollback and skip the batch",
    "hang-step": "this step stalls past the watchdog deadline: CRITICAL, freeze and broadcast",
    "accuracy-collapse": "validation accuracy collapses at this epoch: MAJOR, full rollback",
    "redis-down": "the Oona bus goes down from this epoch: publishing fails fast, drops counted, training goes on",
}

_SPEC = re.compile(r"^(?P<kind>[a-z-]+)@epoch=(?P<epoch>\d+)(?:,step=(?P<step>\d+))?(?:,rank=(?P<rank>\d+))?$")


class DrillError(ValueError):
    """A `--inject` spec is malformed or names an unknown drill."""


class InjectedFault(RuntimeError):
    """Raised by a drill on purpose; `drill` is the drill whose outcome the catcher records."""

    def __init__(self, message: str, drill: Drill | None = None) -> None:
        super().__init__(message)
        self.drill = drill


@dataclass
class Drill:
    kind: str
    epoch: int
    step: int | None = None
    rank: int | None = None  # under torchrun: only this rank (default: every rank)
    fired: bool = False
    outcome: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "epoch": self.epoch, "step": self.step, "rank": self.rank, "fired": self.fired,
                "outcome": self.outcome or ("not reached" if not self.fired else "fired")}


def parse_drill(spec: str) -> Drill:
    match = _SPEC.match(spec.strip())
    if not match:
        raise DrillError(f"--inject {spec!r}: expected KIND@epoch=N[,step=M][,rank=R], e.g. tamiyo-hang@epoch=3")
    kind = match["kind"]
    if kind not in DRILLS:
        raise DrillError(f"--inject {spec!r}: unknown drill {kind!r}; known: {', '.join(sorted(DRILLS))}")
    return Drill(kind, int(match["epoch"]), int(match["step"]) if match["step"] else None,
                 int(match["rank"]) if match["rank"] else None)


@dataclass
class FaultPlan:
    drills: list[Drill] = field(default_factory=list)

    @classmethod
    def parse(cls, specs: list[str], *, rank: int = 0) -> FaultPlan:
        """The drills of `specs` that apply to this rank (a drill without `rank=` applies to all)."""
        return cls([d for d in map(parse_drill, specs) if d.rank is None or d.rank == rank])

    def due(self, kind: str, epoch: int, step: int | None = None) -> Drill | None:
        """The unfired drill of this kind due now (step-less drills fire at their epoch)."""
        for drill in self.drills:
            if drill.kind != kind or drill.fired or drill.epoch != epoch:
                continue
            if drill.step is not None and step is not None and drill.step != step:
                continue
            drill.fired = True
            return drill
        return None

    def active(self, kind: str, epoch: int, span: int = 1) -> Drill | None:
        """A drill of this kind whose window [epoch, epoch+span) covers `epoch` (fires every epoch in it)."""
        for drill in self.drills:
            if drill.kind == kind and drill.epoch <= epoch < drill.epoch + span:
                drill.fired = True
                return drill
        return None

    def record(self, drill: Drill | None, outcome: str) -> None:
        """Set what the drill led to (replacing a provisional outcome set when it fired)."""
        if drill is not None:
            drill.outcome = outcome

    def summary(self) -> list[dict[str, Any]]:
        return [d.as_dict() for d in self.drills]


class _ControllerWrapper:
    """A Tamiyo wrapper whose state (for snapshots) is the wrapped controller's."""

    inner: Any

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict() if hasattr(self.inner, "state_dict") else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict(state)


class FaultyTamiyo(_ControllerWrapper):
    """Wraps a Tamiyo client and misbehaves at the epochs the plan names."""

    def __init__(self, inner: Any, plan: FaultPlan) -> None:
        self.inner = inner
        self.plan = plan
        self._never = threading.Event()

    def evaluate_epoch(self, packet: SystemStatePacket) -> AdaptationCommand:
        epoch = packet.current_epoch
        if (d := self.plan.due("tamiyo-hang", epoch)) is not None:
            d.outcome = "hung; see the handshake fallback"
            self._never.wait(3600)
        if (d := self.plan.due("tamiyo-raise", epoch)) is not None:
            d.outcome = "raised; see the handshake fallback"
            raise InjectedFault("drill tamiyo-raise: controller failed", d)
        if (d := self.plan.due("tamiyo-garbage", epoch)) is not None:
            d.outcome = "answered garbage; see the handshake fallback"
            return AdaptationCommand(command_type=99)  # type: ignore[arg-type]
        command: AdaptationCommand = self.inner.evaluate_epoch(packet)
        if (d := self.plan.due("tamiyo-forged-command", epoch)) is not None:
            d.outcome = "answered a forged command; see the handshake fallback"
            command.annotations["signature"] = "Zm9yZ2VkIHNpZ25hdHVyZQ=="
        return command


class FaultyKasmina:
    """Wraps Kasmina; `apply_command` raises at the epochs the plan names. Everything else passes through."""

    def __init__(self, inner: Any, plan: FaultPlan, epoch_of: Any) -> None:
        self._inner = inner
        self._plan = plan
        self._epoch_of = epoch_of

    def apply_command(self, command: AdaptationCommand) -> Any:
        if (d := self._plan.due("kasmina-raise", self._epoch_of())) is not None:
            raise InjectedFault("drill kasmina-raise: execution layer failed mid-apply", d)
        return self._inner.apply_command(command)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def stall(seconds: float) -> None:
    """Used by slow-boundary and hang-step: a real stall on the calling thread."""
    time.sleep(seconds)


class SigningTamiyo(_ControllerWrapper):
    """Signs an in-process controller's commands, so a drill can show verification rejecting a forgery."""

    def __init__(self, inner: Any, secret: bytes) -> None:
        self.inner = inner
        self.secret = secret

    def evaluate_epoch(self, packet: SystemStatePacket) -> AdaptationCommand:
        from esper.oona import sign_command

        command: AdaptationCommand = self.inner.evaluate_epoch(packet)
        return sign_command(command, self.secret)


class FaultyBus:
    """Wraps an Oona bus; from the drill's epoch on, every publish fails fast as if Redis were down."""

    def __init__(self, inner: Any, plan: FaultPlan, epoch_of: Any) -> None:
        self.inner = inner
        self._plan = plan
        self._epoch_of = epoch_of
        self._drill: Drill | None = next((d for d in plan.drills if d.kind == "redis-down"), None)

    def publish(self, stream: str, envelope: Any) -> str:
        drill = self._drill
        if drill is not None and self._epoch_of() >= drill.epoch:
            from esper.oona import BusUnavailable

            drill.fired = True
            drill.outcome = "bus down: publishes failed fast; see telemetry.publish_failures"
            raise BusUnavailable("drill redis-down: the bus is unreachable")
        return str(self.inner.publish(stream, envelope))

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def wire_drills(plan: FaultPlan, *, tamiyo: Any, kasmina: Any, bus: Any, verifier: Any,
                epoch_of: Any) -> tuple[Any, Any, Any, Any]:
    """Wrap the components the plan's drills break; returns (tamiyo, kasmina, bus, verifier)."""
    if not plan.drills:
        return tamiyo, kasmina, bus, verifier
    kinds = {d.kind for d in plan.drills}
    if "tamiyo-forged-command" in kinds and verifier is None:
        import secrets

        from esper.oona import CommandVerifier

        ephemeral = secrets.token_bytes(32)
        tamiyo, verifier = SigningTamiyo(tamiyo, ephemeral), CommandVerifier(ephemeral)
    if "redis-down" in kinds:
        bus = FaultyBus(bus, plan, epoch_of)
    return FaultyTamiyo(tamiyo, plan), FaultyKasmina(kasmina, plan, epoch_of), bus, verifier


class _NaNGradient(torch.autograd.Function):
    """Adds zero to the loss but sends NaN back to `x`: a non-finite gradient under a finite loss."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.full(ctx.shape, float("nan"), dtype=grad.dtype)


class StepDrills:
    """Drills that act inside a training step or just before a boundary (`perturb`, `before_boundary`)."""

    def __init__(self, trainer: Any) -> None:
        self.t = trainer
        self.plan: FaultPlan = trainer.faults
        self.lr_drill: Drill | None = None

    def perturb(self, loss: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        if not self.plan.drills:
            return loss
        t = self.t
        if (d := self.plan.due("lr-tamper", epoch, batch)) is not None:
            from esper.tolaria.control.lr import HOST_GROUP, tamper_for_drill

            self.lr_drill = d
            tamper_for_drill(t.optim.optimizer, HOST_GROUP, 10.0)
            d.outcome = "tampered; not detected"
        if (d := self.plan.due("nan-loss", epoch, batch)) is not None:
            t.active_drill = d
            return loss * float("nan")
        if (d := self.plan.due("loss-spike", epoch, batch)) is not None:
            t.active_drill = d
            baseline = t.safety.loss.baseline or float(loss)
            return loss * (20.0 * max(1.0, baseline / max(float(loss.detach()), 1e-12)))  # 20x the running baseline
        if (d := self.plan.due("nan-grad", epoch, batch)) is not None:
            t.active_drill = d
            first = next(p for p in t.model.parameters() if p.requires_grad)
            return loss + _NaNGradient.apply(first)
        if (d := self.plan.due("hang-step", epoch, batch)) is not None:
            t.active_drill = d
            watchdog = t.safety.watchdog
            stall(watchdog.deadline_s + 3 * watchdog.poll_s + 0.2)
        return loss

    def before_boundary(self, epoch: int) -> None:
        if (d := self.plan.due("accuracy-collapse", epoch)) is not None:
            from esper.tolaria.recovery.safety import scramble_weights

            self.t.active_drill = d
            scramble_weights(self.t.model)
