"""Fault drills: `tolaria run --inject KIND@epoch=N[,step=M]` rehearses a failure on purpose.

Under torchrun, `rank=R` limits any drill to one rank. `rank-kill` and `rank-hang` rehearse a lost
peer (the others' collectives fail or time out, every rank leaves, `torchrun --max-restarts`
resumes the job); they fire in a job's first attempt only, since the restarted one resumes from a
checkpoint taken before them and must run on as if nothing had happened.

Drills wrap the component they break (a Tamiyo that hangs, a Kasmina that raises, a bus that is
down, a store whose disk fills or whose newest checkpoint rots, a host loss that turns NaN) or
act as a callback at the loop's named hook points (`DrillRig`); production code has no drill
branches. Each drill's outcome is read back from what the run recorded (its emergencies, failed
applies, the LR it restored) and lands in the summary's `drills` list.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from esper.contracts import EventSink, StatefulComponent
from esper.leyline import MESSAGE_PRIORITY_HIGH, TELEMETRY_LEVEL_ERROR, AdaptationCommand, SystemStatePacket
from esper.tolaria.checkpoint import corrupt_latest, recover
from esper.tolaria.control.lr import HOST_GROUP
from esper.tolaria.observe.runlog import RunLog
from esper.tolaria.recovery.checkpoints import Checkpoints
from esper.tolaria.recovery.monitors import Watchdog
from esper.tolaria.state.position import TrainerState

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
    "rank-kill": "this rank is SIGKILLed at this step (torchrun): the others leave, a restart resumes the job",
    "rank-hang": "this rank hangs forever inside this step (torchrun): the others time out and leave, a restart "
                 "resumes the job",
}
RANK_FAULTS = ("rank-kill", "rank-hang")  # a whole process lost: first attempt only

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
        """The drills of `specs` that apply to this rank (a drill without `rank=` applies to all).
        Under torchrun's restarts (`TORCHELASTIC_RESTART_COUNT` > 0) the rank faults are left out:
        the attempt they ended is the one they rehearsed."""
        drills = [parse_drill(spec) for spec in specs]
        size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        hang = next((spec for spec, d in zip(specs, drills, strict=True) if d.kind == "rank-hang"), None)
        if hang is not None and size <= 1:
            raise DrillError(f"--inject {hang!r}: rank-hang needs torchrun (WORLD_SIZE > 1): one process has no "
                             "peer to time out on it and would hang for good; use hang-step for one process")
        for spec, drill in zip(specs, drills, strict=True):
            if drill.rank is not None and drill.rank >= size:  # it would never fire, and nothing would say so
                ranks = "rank 0" if size == 1 else f"ranks 0-{size - 1}"
                raise DrillError(f"--inject {spec!r}: rank={drill.rank}, but this job has {size} process(es) "
                                 f"({ranks}): name one of them, or drop rank= to drill every rank")
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
        return cls([d for d in drills if (d.rank is None or d.rank == rank)
                    and not (restarted and d.kind in RANK_FAULTS)])

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
    """A Tamiyo wrapper whose state (for snapshots) is the wrapped controller's, if it keeps any."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._stateful = isinstance(inner, StatefulComponent)  # checked once, at wiring

    def state_dict(self) -> Any:
        return self.inner.state_dict() if self._stateful else {}

    def load_state_dict(self, state: Any) -> None:
        if self._stateful:
            self.inner.load_state_dict(state)


class FaultyTamiyo(_ControllerWrapper):
    """Wraps a Tamiyo client and misbehaves at the epochs the plan names."""

    def __init__(self, inner: Any, plan: FaultPlan) -> None:
        super().__init__(inner)
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


class SigningTamiyo(_ControllerWrapper):
    """Signs an in-process controller's commands, so a drill can show verification rejecting a forgery."""

    def __init__(self, inner: Any, secret: bytes) -> None:
        super().__init__(inner)
        self.secret = secret

    def evaluate_epoch(self, packet: SystemStatePacket) -> AdaptationCommand:
        from esper.oona import sign_command

        command: AdaptationCommand = self.inner.evaluate_epoch(packet)
        return sign_command(command, self.secret)


class FaultyKasmina:
    """Wraps Kasmina; `apply_command` raises at the epochs the plan names. Everything else passes through."""

    def __init__(self, inner: Any, plan: FaultPlan, epoch_of: Callable[[], int]) -> None:
        self._inner = inner
        self._plan = plan
        self._epoch_of = epoch_of
        self.raised: Drill | None = None  # the drill whose raise awaits its recorded outcome

    def apply_command(self, command: AdaptationCommand) -> Any:
        if (d := self._plan.due("kasmina-raise", self._epoch_of())) is not None:
            self.raised = d
            raise InjectedFault("drill kasmina-raise: execution layer failed mid-apply", d)
        return self._inner.apply_command(command)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class FaultyBus:
    """Wraps an Oona bus; from the drill's epoch on, every publish fails fast as if Redis were down."""

    def __init__(self, inner: Any, plan: FaultPlan, epoch_of: Callable[[], int]) -> None:
        self.inner = inner
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

    def publish_many(self, stream: str, envelopes: list[Any]) -> list[str]:
        """Batches fail alike: the drill's bus is down for every way of publishing."""
        return [self.publish(stream, e) for e in envelopes]

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class DrillLoss:
    """The host loss function, perturbed once when a step drill arms it (NaN, spike, NaN gradient)."""

    def __init__(self, loss_fn: Callable[[Any, Any], torch.Tensor]) -> None:
        self.loss_fn = loss_fn
        self.armed: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, output: Any, batch: Any) -> torch.Tensor:
        loss = self.loss_fn(output, batch)
        perturb, self.armed = self.armed, None
        return perturb(loss) if perturb is not None else loss


class _NaNGradient(torch.autograd.Function):
    """Adds zero to the loss but sends NaN back to `x`: a non-finite gradient under a finite loss."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.shape, ctx.dtype, ctx.device = x.shape, x.dtype, x.device
        return x.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.full(ctx.shape, float("nan"), dtype=ctx.dtype, device=ctx.device)


def stall(seconds: float) -> None:
    """Used by slow-boundary and hang-step: a real stall on the calling thread."""
    time.sleep(seconds)


def _announce(what: str) -> None:
    """A rank fault leaves no summary behind: say on stderr what it did, and when."""
    rank = os.environ.get("RANK", "0")
    print(f"tolaria: drill {what} on rank {rank}", file=sys.stderr, flush=True)


def hang_forever() -> None:
    """The rank-hang drill: this thread never returns. Sleeping, not spinning: signal handlers still
    run (torchrun's SIGTERM must reach the rank's handler), and the CPU stays free for the others."""
    while True:
        time.sleep(3600)


def tamper_lr(optimizer: torch.optim.Optimizer, group_name: str, factor: float) -> float:
    """Multiply group `group_name`'s LR by `factor` behind the LR controller's back (the lr-tamper
    drill): the next `UnifiedLRController.step` must detect it, restore the value and record an
    `LRViolation`. Returns the tampered value."""
    for group in optimizer.param_groups:
        if group.get("name") == group_name:
            group["lr"] = float(group["lr"]) * factor
            return float(group["lr"])
    raise KeyError(f"no optimizer param group named {group_name!r} to tamper with")


def scramble_weights(model: torch.nn.Module) -> None:
    """The accuracy-collapse drill: wreck the host's weights so validation accuracy really collapses."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1234)
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 5.0)


@dataclass
class DrillTargets:
    """What the callback drills act on and read their outcomes from, given once the run is wired."""

    position: TrainerState
    model: torch.nn.Module
    optimizer: Callable[[], torch.optim.Optimizer]
    lr_now: Callable[[], dict[str, float]]
    loss_baseline: Callable[[], float | None]
    watchdog: Watchdog
    checkpoints: Checkpoints
    log: RunLog
    events: EventSink
    stall_boundary_s: float  # the slow-boundary drill's stall: twice the boundary's budget
    breaker_threshold: int  # the slow-boundary drill lasts this many epochs, enough to open the breaker


class DrillRig:
    """Wires a `FaultPlan` into a run: wrappers around the components the drills break, and the
    callbacks acting at the loop's hook points. Empty when the plan is: no wrapper, no callback."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.targets: DrillTargets | None = None
        self._kasmina: FaultyKasmina | None = None
        self._loss: DrillLoss | None = None
        self._lr_drill: Drill | None = None
        self._watched: list[tuple[Drill, int]] = []  # drills answered by the emergency protocol, from record N

    @property
    def active(self) -> bool:
        return bool(self.plan.drills)

    # ---------------------------------------------------------------- wrappers
    def wrap(self, *, tamiyo: Any, kasmina: Any, bus: Any, verifier: Any,
             epoch_of: Callable[[], int]) -> tuple[Any, Any, Any, Any]:
        """Wrap the components the plan's drills break; returns (tamiyo, kasmina, bus, verifier)."""
        if not self.active:
            return tamiyo, kasmina, bus, verifier
        kinds = {d.kind for d in self.plan.drills}
        if "tamiyo-forged-command" in kinds and verifier is None:
            import secrets

            from esper.oona import CommandVerifier

            ephemeral = secrets.token_bytes(32)
            tamiyo, verifier = SigningTamiyo(tamiyo, ephemeral), CommandVerifier(ephemeral)
        if "redis-down" in kinds:
            bus = FaultyBus(bus, self.plan, epoch_of)
        self._kasmina = FaultyKasmina(kasmina, self.plan, epoch_of)
        return FaultyTamiyo(tamiyo, self.plan), self._kasmina, bus, verifier

    def wrap_loss(self, loss_fn: Callable[[Any, Any], torch.Tensor]) -> DrillLoss | None:
        """The host loss the step drills perturb; None (nothing to wrap) for a plan without drills."""
        if not self.active:
            return None
        self._loss = DrillLoss(loss_fn)
        return self._loss

    def disk_fault(self, epoch_of: Callable[[], int]) -> Callable[[str], None] | None:
        """The checkpoint store's fault hook: disk-full fails the write of the drill's epoch."""
        drills = [d for d in self.plan.drills if d.kind == "disk-full"]
        if not drills:
            return None

        def fault(where: str) -> None:
            drill = next((d for d in drills if not d.fired and epoch_of() - 1 >= d.epoch), None)
            if drill is not None:
                drill.fired = True
                drill.outcome = f"ENOSPC while writing {where}; previous checkpoints intact, training continued"
                raise OSError(errno.ENOSPC, "No space left on device (drill disk-full)", where)

        return fault

    def callbacks(self, targets: DrillTargets) -> list[Any]:
        """The callback drills, bound to what they act on; none for an empty plan."""
        self.targets = targets
        return [self] if self.active else []

    # ---------------------------------------------------------------- hook points
    def on_step_begin(self, _trainer: object, step: int) -> None:
        t = self._bound()
        epoch, batch = t.position.epoch, t.position.batch_in_epoch
        if (d := self.plan.due("lr-tamper", epoch, batch)) is not None:
            self._lr_drill = d
            tamper_lr(t.optimizer(), HOST_GROUP, 10.0)
            d.outcome = "tampered; not detected"
        if (d := self.plan.due("nan-loss", epoch, batch)) is not None:
            self._arm(d, lambda loss: loss * float("nan"))
        elif (d := self.plan.due("loss-spike", epoch, batch)) is not None:
            self._arm(d, lambda loss: loss * (20.0 * max(1.0, (t.loss_baseline() or float(loss))
                                                         / max(float(loss.detach()), 1e-12))))
        elif (d := self.plan.due("nan-grad", epoch, batch)) is not None:
            first = next(p for p in t.model.parameters() if p.requires_grad)
            self._arm(d, lambda loss: loss + _NaNGradient.apply(first))
        elif (d := self.plan.due("hang-step", epoch, batch)) is not None:
            self._watch(d)
            stall(t.watchdog.deadline_s + 3 * t.watchdog.poll_s + 0.2)
        if (d := self.plan.due("rank-kill", epoch, batch)) is not None:
            _announce(f"rank-kill: SIGKILL at epoch {epoch} step {batch}")
            os.kill(os.getpid(), signal.SIGKILL)
        if (d := self.plan.due("rank-hang", epoch, batch)) is not None:
            _announce(f"rank-hang: hanging at epoch {epoch} step {batch}")
            hang_forever()

    def on_step_end(self, _trainer: object, step: int, loss: Any) -> None:
        drill = self._lr_drill
        if drill is None:
            return
        t = self._bound()
        expected = t.lr_now()[HOST_GROUP]
        found = next(g["lr"] for g in t.optimizer().param_groups if g.get("name") == HOST_GROUP)
        if found == expected:
            drill.outcome = f"detected at step {step - 1} and reverted to {expected:g}"
            self._lr_drill = None

    def on_boundary_begin(self, _trainer: object, epoch: int) -> None:
        if (d := self.plan.due("accuracy-collapse", epoch)) is not None:
            self._watch(d)
            scramble_weights(self._bound().model)

    def on_boundary_check(self, _trainer: object, epoch: int, report: Any) -> None:
        t = self._bound()
        if (d := self.plan.active("slow-boundary", epoch, t.breaker_threshold)) is not None:
            stall(t.stall_boundary_s)
            d.outcome = "boundary overran its budget; see breakers.boundary_timing and conservative_mode"

    def on_boundary_end(self, _trainer: object, epoch: int, report: Any) -> None:
        t = self._bound()
        self._update_watched()
        if self._kasmina is not None and (d := self._kasmina.raised) is not None and t.log.apply_failures:
            self._kasmina.raised = None
            unchanged = t.log.apply_failures[-1].model_unchanged
            d.outcome = f"recorded, breaker notified; model_unchanged={unchanged}"
        if t.checkpoints.writes and (d := self.plan.due("corrupt-checkpoint", epoch)) is not None:
            self._corrupt_newest(d, t)

    def on_fit_end(self, _trainer: object) -> None:
        self._update_watched()

    # ---------------------------------------------------------------- internals
    def _bound(self) -> DrillTargets:
        if self.targets is None:
            raise RuntimeError("DrillRig.callbacks(targets) must be called before the run starts")
        return self.targets

    def _arm(self, drill: Drill, perturb: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._watch(drill)
        if self._loss is not None:
            self._loss.armed = perturb

    def _watch(self, drill: Drill) -> None:
        self._update_watched()
        self._watched = [(drill, len(self._bound().log.emergencies()))]  # an earlier drill's outcome is final

    def _update_watched(self) -> None:
        """A watched drill's outcome: the last successful response since it fired."""
        if not self._watched:
            return
        records = self._bound().log.emergencies()
        for drill, start in self._watched:
            answered = [r for r in records[start:] if r["ok"]]
            if answered:
                last = answered[-1]
                detail = "no rollback succeeded; the run halted" if last["action"].endswith("halt") else last["detail"]
                drill.outcome = f"{last['level']} {last['kind']}: {detail}"

    def _corrupt_newest(self, drill: Drill, t: DrillTargets) -> None:
        directory = t.checkpoints.directory
        assert directory is not None  # guarded by the caller (checkpoints.writes)
        t.checkpoints.flush()
        victim = corrupt_latest(directory)
        result = recover(directory, clean=False)
        fell_back = result.checkpoint.name if result.checkpoint else "nothing"
        t.log.recovery_events += result.events
        drill.outcome = f"corrupted {victim.parent.name}/{victim.name}; recovery loads {fell_back}"
        t.events("checkpoint_corruption_detected", TELEMETRY_LEVEL_ERROR, MESSAGE_PRIORITY_HIGH,
                 file=f"{victim.parent.name}/{victim.name}", fell_back_to=fell_back)
