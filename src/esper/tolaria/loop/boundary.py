"""The epoch boundary: validate, assemble the state packet, ask Tamiyo, apply, check.

Validation is timed but outside the budget. Tolaria's own work is four phases with the
design's budgets (state assembly 3.5 ms, Tamiyo 12 ms, apply 1.5 ms, check 1 ms; 18 ms in
all); every boundary records each phase, and an overrun is a failure on the
`boundary_timing` breaker. Callbacks at `HookPoint.BOUNDARY_CHECK` run inside the check phase
and count against its budget.

Every command is journaled before it is applied (`checkpoint.journal`); a resumed run's
boundaries that the interrupted run already passed apply what the journal says: Tamiyo is still
asked (so its own state evolves as in the uninterrupted run), and a difference is an event.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from esper.contracts import EventSink, ExecutionLayer
from esper.leyline import (
    COMMAND_SEED,
    MESSAGE_PRIORITY_HIGH,
    SEED_OP_GERMINATE,
    SEED_STAGE_DORMANT,
    SEED_STAGE_FOSSILIZED,
    TELEMETRY_LEVEL_ERROR,
    TELEMETRY_LEVEL_WARNING,
    AdaptationCommand,
    HardwareContext,
    SeedLifecycleStage,
    SystemStatePacket,
    is_noop,
    noop_command,
    system_state_packet,
)
from esper.tolaria.checkpoint.journal import CommandJournal
from esper.tolaria.config import TolariaConfig
from esper.tolaria.control.breakers import BreakerBoard, CircuitBreaker
from esper.tolaria.control.conservative import ConservativeMode
from esper.tolaria.control.lr import UnifiedLRController
from esper.tolaria.distributed import World
from esper.tolaria.loop.apply import CommandApplier, command_note
from esper.tolaria.loop.evaluate import Validation
from esper.tolaria.loop.handshake import HandshakeOutcome, TamiyoHandshake, is_germination
from esper.tolaria.observe.profiling import Profiler
from esper.tolaria.observe.runlog import Fallback, RunLog
from esper.tolaria.observe.timing import OWN_PHASES, MonotonicTimer
from esper.tolaria.state.position import RunIdentity, TrainerState


@dataclass
class BoundaryReport:
    epoch: int
    val_loss: float
    val_accuracy: float  # the task's score: its primary metric, higher is better
    val_metrics: dict[str, float] = field(default_factory=dict)
    attribution: dict[str, dict[str, float]] = field(default_factory=dict)  # Validation.attribution
    command: AdaptationCommand | None = None
    fallback: str = ""
    applied: bool = False
    apply_reason: str = ""
    phases_ms: dict[str, float] = field(default_factory=dict)
    own_ms: float = 0.0
    breaches: dict[str, float] = field(default_factory=dict)

    def command_line(self) -> str:
        """The history's line for this boundary's command (`apply.command_note`)."""
        return command_note(self.command, self.applied, self.apply_reason)


def hardware_context() -> HardwareContext:
    """What Tamiyo is told about the machine; cheap enough for every boundary."""
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        major, minor = torch.cuda.get_device_capability()
        return HardwareContext(device_type="cuda", device_id=torch.cuda.get_device_name(),
                               total_memory_gb=total / 2**30, available_memory_gb=free / 2**30,
                               compute_capability=major * 10 + minor)
    page = os.sysconf("SC_PAGE_SIZE")
    return HardwareContext(device_type="cpu", device_id=f"{os.cpu_count()}-core",
                           total_memory_gb=os.sysconf("SC_PHYS_PAGES") * page / 2**30,
                           available_memory_gb=os.sysconf("SC_AVPHYS_PAGES") * page / 2**30)


class EpochBoundary:
    """Runs one boundary; every component it uses is given, none is reached through another."""

    def __init__(self, *, config: TolariaConfig, position: TrainerState, identity: RunIdentity,
                 validate: Callable[[], Validation], kasmina: ExecutionLayer, consult: TamiyoConsult,
                 applier: CommandApplier, journal: CommandJournal, breakers: BreakerBoard,
                 conservative: ConservativeMode, lr: UnifiedLRController, nonfinite_steps: Callable[[], int],
                 world: World, timer: MonotonicTimer, profiler: Profiler, log: RunLog, events: EventSink,
                 on_check: Callable[[int, BoundaryReport], None]) -> None:
        self.config, self.position, self.identity = config, position, identity
        self.validate, self.kasmina, self.consult, self.applier, self.journal = \
            validate, kasmina, consult, applier, journal
        self.breakers, self.conservative, self.lr, self.nonfinite_steps = breakers, conservative, lr, nonfinite_steps
        self.world, self.timer, self.profiler, self.log, self.events = world, timer, profiler, log, events
        self.on_check = on_check  # the BOUNDARY_CHECK callbacks
        self.hardware = hardware_context()

    def run(self, epoch: int, train_loss: float) -> BoundaryReport:
        span, phase = self.profiler.span, self.timer.phase
        with span("boundary.validate"), phase("validate"):
            self.world.sync_buffers(self.kasmina.model)  # BatchNorm statistics agree before anything reads them
            validation = self.validate()
            val_loss, val_acc = validation.loss, validation.score
            self.lr.report_validation(val_loss)
        self.kasmina.on_epoch_end(epoch, val_loss, val_acc)
        report = BoundaryReport(epoch, val_loss, val_acc, validation.metrics, validation.attribution)
        with span("boundary.state_assembly"), phase("state_assembly"):
            packet = self.assemble(epoch, train_loss, validation)
        with span("boundary.tamiyo"), phase("tamiyo"):
            outcome = self.consult.ask(packet)
        with span("boundary.apply"), phase("apply"):
            self.apply(outcome, report)
        with span("boundary.check"):
            started = time.perf_counter_ns()
            self.on_check(epoch, report)
            self.check(epoch, report, started)
            self.timer.record("check", (time.perf_counter_ns() - started) / 1e6)
        self.timer.record("total", report.own_ms)
        return report

    # ---------------------------------------------------------------- phases
    def assemble(self, epoch: int, train_loss: float, validation: Validation) -> SystemStatePacket:
        """The packet: validation_loss is the task's mean loss, validation_accuracy its score, and
        training_metrics every validation metric as `val.<name>` (tasks.protocol)."""
        seeds = self.kasmina.export_seed_states()
        metrics = {**{f"val.{k}": v for k, v in validation.metrics.items()},
            "boundary_ms_last": self.timer.last.get("total", 0.0),
            "lr_host": self.lr.current().get("host", 0.0),
            "param_count": float(param_count(self.kasmina.model)),
            "rollbacks_total": float(len(self.log.rollbacks)),
            "nonfinite_steps": float(self.nonfinite_steps()),
            "flops_total": self.log.last_epoch.flops if self.log.last_epoch else 0.0,  # up to the last boundary
        }
        conservative = self.conservative.active
        if conservative:  # reduced per-seed detail while conservative
            seeds = [s for s in seeds if s.stage != SEED_STAGE_FOSSILIZED]
        packet = system_state_packet(
            epoch=epoch, global_step=self.position.global_step, training_loss=train_loss,
            validation_loss=validation.loss, validation_accuracy=validation.score, seed_states=seeds,
            training_metrics=metrics, hardware=self.hardware, run_id=self.identity.run_id,
            experiment_name=self.identity.name, conservative_mode=conservative,
        )
        packet.rolled_back_commands.extend(self.applier.rolled_back_since(self.log.rollbacks))  # for Tamiyo to learn
        return packet

    def apply(self, outcome: HandshakeOutcome, report: BoundaryReport) -> None:
        step = self.position.global_step
        if self.journal.replaying(step):
            self._apply_journaled(outcome.command, self.journal.take(step), report)
            return
        command = outcome.command
        report.command, report.fallback = command, outcome.failure_kind
        if self.conservative.active and is_germination(command):
            self.events("germination_blocked", TELEMETRY_LEVEL_WARNING, reason="conservative mode",
                        command_id=command.command_id)
            report.apply_reason = "germination blocked in conservative mode"
            return
        if is_noop(command):
            report.apply_reason = command.annotations.get("reason", "no-op")
            return
        report.applied, report.apply_reason = self.applier.apply(command, report.epoch)

    def _apply_journaled(self, asked: AdaptationCommand, journaled: AdaptationCommand | None,
                         report: BoundaryReport) -> None:
        """A boundary the interrupted run already passed: apply what it applied, at most once."""
        if _effect(asked) != _effect(journaled):
            self.events("journal_replay_differs", TELEMETRY_LEVEL_WARNING, step=self.position.global_step,
                        tamiyo=_describe(asked), journaled=_describe(journaled))
        report.command = journaled if journaled is not None else asked
        if journaled is None:
            report.apply_reason = "replay: the interrupted run applied no command at this boundary"
            return
        if _already_present(journaled, self.kasmina.export_seed_states()):
            report.apply_reason = f"replay: {journaled.target_seed_id} already holds a seed; not applied twice"
            return
        # Journaled already, by the interrupted run.
        report.applied, reason = self.applier.apply(journaled, report.epoch, journal=False)
        report.apply_reason = f"replayed from the journal: {reason}"

    def check(self, epoch: int, report: BoundaryReport, started_ns: int) -> None:
        """Compare this boundary's phases with their budgets; the check phase is measured up to
        the decision, which is all of it that can be."""
        budgets = self.timer.budgets_ms
        report.phases_ms = {p: self.timer.last.get(p, 0.0) for p in ("validate", *OWN_PHASES[:-1])}
        report.phases_ms["check"] = (time.perf_counter_ns() - started_ns) / 1e6
        breaches = {p: report.phases_ms[p] for p in OWN_PHASES if report.phases_ms[p] > budgets[p]}
        report.own_ms = sum(report.phases_ms[p] for p in OWN_PHASES)
        if report.own_ms > budgets["total"]:
            breaches["total"] = report.own_ms
        report.breaches = breaches
        timing = self.breakers["boundary_timing"]
        # One vote (under torchrun): a breach on any rank counts on all, and a breaker open on any rank
        # (the checkpoint breaker is rank 0's alone) puts every rank in conservative mode. The timing
        # breaker is left out of the second flag: the first one makes it the same on every rank.
        others_open = any(n != "boundary_timing" for n in self.breakers.open_names())
        breached, peer_open = self.world.agree_any(bool(breaches), others_open)
        if breached:
            what = ", ".join(f"{k} {v:.1f} ms > {budgets[k]:.1f} ms" for k, v in breaches.items()) or "on another rank"
            timing.record_failure(f"epoch {epoch}: {what}")
            self.events("boundary_budget_breach", TELEMETRY_LEVEL_WARNING, epoch=epoch, phases=what)
        else:
            timing.record_success()
        self._decide_conservative(epoch, peer_open)

    def _decide_conservative(self, epoch: int, peer_open: bool) -> None:
        open_names = self.breakers.open_names()
        reasons = [f"{n}: {self.breakers[n].last_reason}" for n in open_names]
        if peer_open and not open_names:  # ranks enter and leave together
            open_names, reasons = ["peer"], ["a breaker is open on another rank"]
        change = self.conservative.update(epoch, open_names, reasons)
        if change == "entered":
            self.events("conservative_mode_entered", TELEMETRY_LEVEL_ERROR, MESSAGE_PRIORITY_HIGH,
                        epoch=epoch, breakers=",".join(open_names), reasons="; ".join(reasons))
        elif change == "exited":
            self.events("conservative_mode_exited", TELEMETRY_LEVEL_WARNING, MESSAGE_PRIORITY_HIGH, epoch=epoch)


class TamiyoConsult:
    """Asks Tamiyo through the handshake, behind its breaker, with conservative mode's shorter leash."""

    def __init__(self, *, handshake: TamiyoHandshake, breaker: CircuitBreaker, conservative: ConservativeMode,
                 world: World, config: TolariaConfig, log: RunLog, events: EventSink) -> None:
        self.handshake, self.breaker, self.conservative, self.world = handshake, breaker, conservative, world
        self.morphogenesis = config.run.morphogenesis
        self.timeout_s = config.handshake.tamiyo_timeout_s
        self.conservative_factor = config.conservative.tamiyo_timeout_factor
        self.log, self.events = log, events

    def ask(self, packet: SystemStatePacket) -> HandshakeOutcome:
        """Rank 0 asks Tamiyo; every rank gets the same outcome and records it alike."""
        if not self.morphogenesis:
            return HandshakeOutcome(noop_command(issued_by="tolaria", reason="morphogenesis disabled"), False)
        breaker = self.breaker
        if not breaker.allow():  # same breaker state on every rank, so the same answer
            command = noop_command(issued_by="tolaria", reason="fallback: tamiyo breaker open")
            command.annotations["fallback"] = "breaker_open"
            return HandshakeOutcome(command, True, "breaker_open", "tamiyo breaker is OPEN; controller skipped")
        outcome = self._exchange(packet) if self.world.is_leader else None
        outcome = _unpack_outcome(self.world.broadcast_object(_pack_outcome(outcome)))
        if outcome.fallback:
            # "late" missed only conservative mode's shorter leash: the controller did not fail.
            opened = outcome.is_failure and breaker.record_failure(f"{outcome.failure_kind}: {outcome.failure}")
            self.events("tamiyo_fallback", TELEMETRY_LEVEL_WARNING, kind=outcome.failure_kind,
                        reason=outcome.failure, breaker_opened=opened)
            self.log.add_fallback(Fallback(packet.current_epoch, outcome.failure_kind, outcome.failure))
        else:
            breaker.record_success()
        return outcome

    def _exchange(self, packet: SystemStatePacket) -> HandshakeOutcome:
        timeout = self.timeout_s
        # The half-open probe decides whether the controller recovered: it gets the full deadline.
        if self.conservative.active and self.breaker.is_closed:
            timeout *= self.conservative_factor
        return self.handshake.exchange(packet, timeout_s=timeout)


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _effect(command: AdaptationCommand | None) -> bytes | None:
    """What a command does, without its identity (id, issue time, issuer, annotations)."""
    if command is None or is_noop(command):
        return None
    core = AdaptationCommand()
    core.CopyFrom(command)
    for name in ("command_id", "issued_at", "issued_by", "annotations", "execution_deadline_ms"):
        core.ClearField(name)
    return core.SerializeToString(deterministic=True)


def _describe(command: AdaptationCommand | None) -> str:
    if command is None or is_noop(command):
        return "no-op"
    return f"{command.target_seed_id or '-'} {command.WhichOneof('payload') or 'no payload'}"


def _already_present(command: AdaptationCommand, seeds: list[Any]) -> bool:
    """A GERMINATE whose slot is no longer dormant has had its effect (or cannot have it twice)."""
    if command.command_type != COMMAND_SEED or command.seed_operation.operation != SEED_OP_GERMINATE:
        return False
    return not any(s.seed_id == command.target_seed_id and s.stage == SEED_STAGE_DORMANT for s in seeds)


def stage_name(stage: int) -> str:
    return SeedLifecycleStage.Name(stage).removeprefix("SEED_STAGE_")  # type: ignore[arg-type]


def seed_stages(seeds: list[Any], recorded: Mapping[str, str]) -> dict[str, str]:
    """Every seed's stage now (seed_id -> stage name; dormant slots are not seeds). A culled seed
    leaves Kasmina's export: a recorded seed no longer present is CULLED."""
    stages = {s.seed_id: stage_name(s.stage) for s in seeds if stage_name(s.stage) != "DORMANT"}
    stages.update({sid: "CULLED" for sid in recorded if sid not in stages})
    return stages


def _pack_outcome(outcome: HandshakeOutcome | None) -> tuple[bytes, bool, str, str, float] | None:
    """The outcome as Leyline bytes plus plain values, for the broadcast to other ranks."""
    if outcome is None:
        return None
    return (outcome.command.SerializeToString(deterministic=True), outcome.fallback, outcome.failure_kind,
            outcome.failure, outcome.latency_ms)


def _unpack_outcome(packed: tuple[bytes, bool, str, str, float] | None) -> HandshakeOutcome:
    if packed is None:
        raise RuntimeError("rank 0 sent no handshake outcome")
    data, fallback, kind, failure, latency = packed
    return HandshakeOutcome(AdaptationCommand.FromString(data), fallback, kind, failure, latency)
