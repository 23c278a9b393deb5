"""The epoch boundary: validate, assemble the state packet, ask Tamiyo, apply, check.

Validation is timed but outside the budget. Tolaria's own work is four phases with the
design's budgets (state assembly 3.5 ms, Tamiyo 12 ms, apply 1.5 ms, check 1 ms; 18 ms in
all); every boundary records each phase, and an overrun is a failure on the
`boundary_timing` breaker.

Journaled commands: every command is journaled in the checkpoint WAL before it is applied
(`journal_command`), and every rollback journals a REWIND. On resume, the commands journaled
after the restored checkpoint are replayed at the boundaries where they were first applied:
Tamiyo is still asked (so its own state evolves as in the uninterrupted run), but the journal
decides what is applied, up to the last journaled boundary; a difference is recorded as an event.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

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
    LeylineError,
    SeedLifecycleStage,
    SystemStatePacket,
    is_noop,
    noop_command,
    parse,
    system_state_packet,
)
from esper.tolaria.loop.handshake import HandshakeOutcome, is_germination

if TYPE_CHECKING:
    from esper.tolaria.checkpoint.wal import WalRecord
    from esper.tolaria.loop.trainer import TolariaTrainer

OWN_PHASES = ("state_assembly", "tamiyo", "apply", "check")


@dataclass
class BoundaryReport:
    epoch: int
    val_loss: float
    val_accuracy: float
    command: AdaptationCommand | None = None
    fallback: str = ""
    applied: bool = False
    apply_reason: str = ""
    phases_ms: dict[str, float] = field(default_factory=dict)
    own_ms: float = 0.0
    breaches: dict[str, float] = field(default_factory=dict)


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
    """Runs one boundary against the trainer's components; the trainer owns all state."""

    def __init__(self, trainer: TolariaTrainer) -> None:
        self.t = trainer
        self._journal: dict[int, AdaptationCommand] = {}  # global step -> command to replay there
        self._journal_until = -1  # the last journaled boundary's step: up to it, the journal decides

    def replay_journal(self, records: list[WalRecord]) -> None:
        """Commands journaled after the restored checkpoint (see `recover`), replayed at their steps."""
        self._journal, self._journal_until = {}, -1
        for rec in records:
            try:
                self._journal[rec.step] = parse(AdaptationCommand, rec.payload)
            except LeylineError as exc:
                self.t.record_event("journal_command_unreadable", TELEMETRY_LEVEL_ERROR, step=rec.step, error=str(exc))
                continue
            self._journal_until = max(self._journal_until, rec.step)

    def forget_journal(self) -> None:
        """After a rollback, Tamiyo decides again: the journaled future is no longer this history's."""
        self._journal, self._journal_until = {}, -1

    def run(self, epoch: int, train_loss: float) -> BoundaryReport:
        t = self.t
        with t.profiler.span("boundary.validate"), t.timer.phase("validate"):
            val_loss, val_acc = t.validate()
        t.kasmina.on_epoch_end(epoch, val_loss, val_acc)
        report = BoundaryReport(epoch, val_loss, val_acc)
        with t.profiler.span("boundary.state_assembly"), t.timer.phase("state_assembly"):
            packet = self.assemble(epoch, train_loss, val_loss, val_acc)
        with t.profiler.span("boundary.tamiyo"), t.timer.phase("tamiyo"):
            outcome = self.ask_tamiyo(packet)
        with t.profiler.span("boundary.apply"), t.timer.phase("apply"):
            self.apply(outcome, report)
        with t.profiler.span("boundary.check"):
            started = time.perf_counter_ns()
            if (d := t.faults.active("slow-boundary", epoch, t.config.breakers.failure_threshold)) is not None:
                time.sleep(t.config.boundary.total_ms * 2 / 1000)
                d.outcome = "boundary overran its budget; see breakers.boundary_timing and conservative_mode"
            self.check(epoch, report, started)
            t.timer.record("check", (time.perf_counter_ns() - started) / 1e6)
        t.timer.record("total", report.own_ms)
        return report

    # ---------------------------------------------------------------- phases
    def assemble(self, epoch: int, train_loss: float, val_loss: float, val_acc: float) -> SystemStatePacket:
        t = self.t
        seeds = t.kasmina.export_seed_states()
        metrics = {
            "boundary_ms_last": t.timer.last.get("total", 0.0),
            "lr_host": t.lr.current().get("host", 0.0),
            "param_count": float(t.param_count()),
            "rollbacks_total": float(len(t.rollbacks)),
            "nonfinite_steps": float(t.aggregator.nonfinite_steps),
        }
        if t.conservative.active:  # reduced per-seed detail while conservative
            seeds = [s for s in seeds if s.stage != SEED_STAGE_FOSSILIZED]
        return system_state_packet(
            epoch=epoch, global_step=t.state.global_step, training_loss=train_loss,
            validation_loss=val_loss, validation_accuracy=val_acc, seed_states=seeds,
            training_metrics=metrics, hardware=t.hardware, run_id=t.run_id,
            experiment_name=t.config.run.name, conservative_mode=t.conservative.active,
        )

    def ask_tamiyo(self, packet: SystemStatePacket) -> HandshakeOutcome:
        """Rank 0 asks Tamiyo; every rank gets the same outcome and records it alike."""
        t = self.t
        breaker = t.breakers["tamiyo"]
        if not t.morphogenesis:
            return HandshakeOutcome(noop_command(issued_by="tolaria", reason="morphogenesis disabled"), False)
        if not breaker.allow():  # same breaker state on every rank, so the same answer
            command = noop_command(issued_by="tolaria", reason="fallback: tamiyo breaker open")
            command.annotations["fallback"] = "breaker_open"
            return HandshakeOutcome(command, True, "breaker_open", "tamiyo breaker is OPEN; controller skipped")
        outcome = self._exchange(packet) if t.world.is_leader else None
        outcome = _unpack_outcome(t.world.broadcast_object(_pack_outcome(outcome)))
        if outcome.fallback:
            # "late" missed only conservative mode's shorter leash: the controller did not fail.
            opened = outcome.is_failure and breaker.record_failure(f"{outcome.failure_kind}: {outcome.failure}")
            t.record_event("tamiyo_fallback", TELEMETRY_LEVEL_WARNING, kind=outcome.failure_kind,
                           reason=outcome.failure, breaker_opened=opened)
            t.fallbacks.append({"epoch": packet.current_epoch, "kind": outcome.failure_kind,
                                "reason": outcome.failure})
        else:
            breaker.record_success()
        return outcome

    def _exchange(self, packet: SystemStatePacket) -> HandshakeOutcome:
        t = self.t
        timeout = t.config.handshake.tamiyo_timeout_s
        # The half-open probe decides whether the controller recovered: it gets the full deadline.
        if t.conservative.active and t.breakers["tamiyo"].is_closed:
            timeout *= t.config.conservative.tamiyo_timeout_factor
        return t.handshake.exchange(packet, timeout_s=timeout)

    def apply(self, outcome: HandshakeOutcome, report: BoundaryReport) -> None:
        t = self.t
        if t.state.global_step <= self._journal_until:
            self._apply_journaled(outcome.command, self._journal.pop(t.state.global_step, None), report)
            return
        command = outcome.command
        report.command, report.fallback = command, outcome.failure_kind
        if t.conservative.active and is_germination(command):
            t.record_event("germination_blocked", TELEMETRY_LEVEL_WARNING, reason="conservative mode",
                           command_id=command.command_id)
            report.apply_reason = "germination blocked in conservative mode"
            return
        if is_noop(command):
            report.apply_reason = command.annotations.get("reason", "no-op")
            return
        t.apply_command(command, report)

    def _apply_journaled(self, asked: AdaptationCommand, journaled: AdaptationCommand | None,
                         report: BoundaryReport) -> None:
        """A boundary the interrupted run already passed: apply what it applied, at most once."""
        t = self.t
        step = t.state.global_step
        if step >= self._journal_until:
            self.forget_journal()  # the last replayed boundary: Tamiyo decides from the next one
        if _effect(asked) != _effect(journaled):
            t.record_event("journal_replay_differs", TELEMETRY_LEVEL_WARNING, step=step,
                           tamiyo=_describe(asked), journaled=_describe(journaled))
        report.command = journaled if journaled is not None else asked
        if journaled is None:
            report.apply_reason = "replay: the interrupted run applied no command at this boundary"
            return
        if _already_present(journaled, t.kasmina.export_seed_states()):
            report.apply_reason = f"replay: {journaled.target_seed_id} already holds a seed; not applied twice"
            return
        t.apply_command(journaled, report, journal=False)  # journaled already, by the interrupted run
        report.apply_reason = f"replayed from the journal: {report.apply_reason}"

    def check(self, epoch: int, report: BoundaryReport, started_ns: int) -> None:
        """Compare this boundary's phases with their budgets; the check phase is measured up to
        the decision, which is all of it that can be."""
        t = self.t
        budgets = t.timer.budgets_ms
        report.phases_ms = {p: t.timer.last.get(p, 0.0) for p in ("validate", *OWN_PHASES[:-1])}
        report.phases_ms["check"] = (time.perf_counter_ns() - started_ns) / 1e6
        breaches = {p: report.phases_ms[p] for p in OWN_PHASES if report.phases_ms[p] > budgets[p]}
        report.own_ms = sum(report.phases_ms[p] for p in OWN_PHASES)
        if report.own_ms > budgets["total"]:
            breaches["total"] = report.own_ms
        report.breaches = breaches
        timing = t.breakers["boundary_timing"]
        if t.world.agree_flag(bool(breaches)):  # a breach on any rank counts on all, so states stay equal
            what = ", ".join(f"{k} {v:.1f} ms > {budgets[k]:.1f} ms" for k, v in breaches.items()) or "on another rank"
            timing.record_failure(f"epoch {epoch}: {what}")
            t.record_event("boundary_budget_breach", TELEMETRY_LEVEL_WARNING, epoch=epoch, phases=what)
        else:
            timing.record_success()
        self._decide_conservative(epoch)

    def _decide_conservative(self, epoch: int) -> None:
        t = self.t
        open_names = t.breakers.open_names()
        reasons = [f"{n}: {t.breakers[n].last_reason}" for n in open_names]
        if t.world.agree_flag(bool(open_names)) and not open_names:  # ranks enter and leave together
            open_names, reasons = ["peer"], ["a breaker is open on another rank"]
        change = t.conservative.update(epoch, open_names, reasons)
        if change == "entered":
            t.record_event("conservative_mode_entered", TELEMETRY_LEVEL_ERROR, MESSAGE_PRIORITY_HIGH,
                           epoch=epoch, breakers=",".join(open_names), reasons="; ".join(reasons))
        elif change == "exited":
            t.record_event("conservative_mode_exited", TELEMETRY_LEVEL_WARNING, MESSAGE_PRIORITY_HIGH, epoch=epoch)


def journal_command(t: TolariaTrainer, command: AdaptationCommand, epoch: int) -> None:
    """Journal `command` durably before it is applied (rank 0, when checkpoints are on)."""
    store = t.safety.store
    if store is None:
        return
    try:
        store.journal_command(command, epoch=epoch, step=t.state.global_step)
    except (OSError, ValueError) as exc:  # the WAL is full or closed: apply anyway, but say resume may differ
        t.record_event("command_journal_failed", TELEMETRY_LEVEL_ERROR, command_id=command.command_id,
                       error=str(exc), consequence="a resume before the next checkpoint may not replay it")


def journal_rewind(t: TolariaTrainer, step: int, epoch: int, reason: str) -> None:
    """Training went back to `step`: later journaled commands belong to an abandoned history."""
    t.boundary.forget_journal()
    store = t.safety.store
    if store is None:
        return
    try:
        store.journal_rewind(epoch=epoch, step=step, reason=reason)
    except (OSError, ValueError) as exc:
        t.record_event("command_journal_failed", TELEMETRY_LEVEL_ERROR, error=str(exc),
                       consequence="a resume before the next checkpoint may replay an abandoned command")


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


def seed_stage_changes(previous: dict[str, str], seeds: list[Any]) -> dict[str, str]:
    """Seeds (not dormant slots) whose stage differs from `previous`: seed_id -> stage name."""
    changes = {}
    for s in seeds:
        name = stage_name(s.stage)
        if name != "DORMANT" and previous.get(s.seed_id) != name:
            changes[s.seed_id] = name
    return changes


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
