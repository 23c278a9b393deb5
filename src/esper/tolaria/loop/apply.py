"""Applying one command: journal it, check it against the growth budgets, apply it through Kasmina,
rebuild the optimizer for what changed.

The veto runs before anything changes: a GERMINATE whose seed would take the model past
`growth.max_params` parameters or `growth.max_memory_mb` (parameters, gradients and two optimizer
moments), or a FOSSILIZE of a seed whose last attribution is negative, is refused with the reason
in a `command_vetoed` event and the run log; the command stays journaled (it was decided), and a
replay refuses it again from the same numbers. A raise from the execution layer is recorded (run
log, event, Kasmina's breaker) and the boundary goes on: the contract is that a failed apply
leaves the model unchanged, and the structure is compared before and after to say whether it did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import nn

from esper.contracts import EventSink, ExecutionLayer
from esper.leyline import (
    COMMAND_SEED,
    SEED_OP_FOSSILIZE,
    SEED_OP_GERMINATE,
    TELEMETRY_LEVEL_ERROR,
    TELEMETRY_LEVEL_INFO,
    TELEMETRY_LEVEL_WARNING,
    AdaptationCommand,
    RolledBackCommand,
)
from esper.tolaria.checkpoint.journal import CommandJournal
from esper.tolaria.config import GrowthConfig
from esper.tolaria.control.breakers import CircuitBreaker
from esper.tolaria.control.optimizer import DynamicOptimizerManager
from esper.tolaria.observe.runlog import ApplyFailure, RollbackEntry, RunLog
from esper.tolaria.state.position import TrainerState

# Parameter, gradient and two optimizer moments: what training holds per parameter (Adam's count).
_COPIES_PER_PARAM = 4


@dataclass(frozen=True)
class Applied:
    """A seed command that changed the model, and the boundary (epoch) that applied it."""

    epoch: int
    command: AdaptationCommand


@runtime_checkable
class GerminationCost(Protocol):
    """An execution layer that says what a germination would add (`esper.kasmina.KasminaLayer`)."""

    def germination_params(self, slot: str, blueprint: str = "") -> int | None: ...


class CommandApplier:
    def __init__(self, kasmina: ExecutionLayer, optim: DynamicOptimizerManager, breaker: CircuitBreaker,
                 journal: CommandJournal, log: RunLog, events: EventSink, position: TrainerState,
                 growth: GrowthConfig | None = None) -> None:
        self.kasmina, self.optim, self.breaker = kasmina, optim, breaker
        self.journal, self.log, self.events, self.position = journal, log, events, position
        self.growth = growth or GrowthConfig()
        self.attribution: dict[str, dict[str, float]] = {}  # the last validation's (Validation.attribution)
        # Kept outside every snapshot, so a rollback cannot erase what it undid.
        self.applied: list[Applied] = []
        self._rollbacks_seen = 0

    def apply(self, command: AdaptationCommand, epoch: int, *, journal: bool = True) -> tuple[bool, str]:
        """Apply `command`; returns (applied, reason). The command is journaled in the WAL first
        (durable), so a resume can replay it; a replay passes `journal=False`."""
        if journal:
            self.journal.record(command, epoch=epoch, step=self.position.global_step)
        refused = self.veto(command)
        if refused is not None:
            self.log.add_apply_failure(ApplyFailure(epoch, command.command_id, refused, True))
            self.events("command_vetoed", TELEMETRY_LEVEL_WARNING, command_id=command.command_id,
                        seed_id=command.target_seed_id, reason=refused)
            return False, refused
        before = structure_fingerprint(self.kasmina.model)
        try:
            result = self.kasmina.apply_command(command)
        except Exception as exc:  # noqa: BLE001 - any failure of the execution layer is recorded here
            self._record_failure(command, epoch, exc, unchanged=structure_fingerprint(self.kasmina.model) == before)
            return False, f"apply failed: {exc}"
        self.breaker.record_success()
        if not result.ok:
            self.events("command_rejected", TELEMETRY_LEVEL_WARNING, command_id=command.command_id,
                        reason=result.reason)
            return False, result.reason
        if result.structure_changed:
            rebuilt = self.optim.rebuild(result.added_params, result.removed_params, result.reshaped_params,
                                         result.frozen_params)
            self.events("optimizer_rebuilt", TELEMETRY_LEVEL_INFO, ok=rebuilt.ok, added=len(result.added_params),
                        removed=len(result.removed_params), frozen=len(result.frozen_params))
        self.events("command_applied", TELEMETRY_LEVEL_INFO, command_id=command.command_id,
                    seed_id=result.seed_id, reason=result.reason)
        if command.command_type == COMMAND_SEED:
            self.applied.append(Applied(epoch, command))
        return True, result.reason

    def rolled_back_since(self, rollbacks: Sequence[RollbackEntry]) -> list[RolledBackCommand]:
        """The applied commands the rollbacks recorded since the last call undid: those a boundary
        applied at or after the epoch the restored state starts at (the snapshot of boundary N
        starts epoch N + 1 and holds what boundary N applied), up to the incident's epoch."""
        undone: list[RolledBackCommand] = []
        for rollback in rollbacks[self._rollbacks_seen:]:
            if not rollback.succeeded:
                continue
            gone = [a for a in self.applied if rollback.target_epoch <= a.epoch <= rollback.epoch]
            self.applied = [a for a in self.applied if a not in gone]
            undone += [RolledBackCommand(
                command_id=a.command.command_id, target_seed_id=a.command.target_seed_id,
                operation=a.command.seed_operation.operation, blueprint_id=a.command.seed_operation.blueprint_id,
                applied_epoch=a.epoch, reason=rollback.reason, incident_kind=incident_kind(rollback.reason))
                for a in gone]
        self._rollbacks_seen = len(rollbacks)
        return undone

    def veto(self, command: AdaptationCommand) -> str | None:
        """Why `command` must not be applied (see the module docstring), or None. Changes nothing."""
        if command.command_type != COMMAND_SEED or command.WhichOneof("payload") != "seed_operation":
            return None
        op, target = command.seed_operation.operation, command.target_seed_id
        if op == SEED_OP_GERMINATE:
            return self._over_budget(target, command.seed_operation.blueprint_id)
        if op == SEED_OP_FOSSILIZE and self.growth.veto_unpaid_fossilize:
            paid = self.attribution.get(target, {}).get("loss")
            if paid is not None and paid < 0:
                return (f"vetoed: FOSSILIZE {target}: its attribution_loss is {paid:.6g} < 0 (validation is better "
                        "without it); cull it or keep it in probation (growth.veto_unpaid_fossilize)")
        return None

    def _over_budget(self, slot: str, blueprint: str) -> str | None:
        g = self.growth
        if not (g.max_params or g.max_memory_mb) or not isinstance(self.kasmina, GerminationCost):
            return None
        added = self.kasmina.germination_params(slot, blueprint)
        if added is None:
            return None  # Kasmina rejects it, with its own reason
        params = list(self.kasmina.model.parameters())
        after = sum(p.numel() for p in params) + added
        if g.max_params and after > g.max_params:
            return (f"vetoed: GERMINATE in {slot!r} would grow the model to {after:,} parameters (+{added:,}), past "
                    f"growth.max_params {g.max_params:,}; raise the budget or grow a smaller blueprint")
        mib = after * (params[0].element_size() if params else 4) * _COPIES_PER_PARAM / 2**20
        if g.max_memory_mb and mib > g.max_memory_mb:
            return (f"vetoed: GERMINATE in {slot!r} would need {mib:.1f} MiB for parameters, gradients and optimizer "
                    f"state, past growth.max_memory_mb {g.max_memory_mb:g}")
        return None

    def _record_failure(self, command: AdaptationCommand, epoch: int, exc: Exception, *, unchanged: bool) -> None:
        error = f"{type(exc).__name__}: {exc}"
        opened = self.breaker.record_failure(error)
        self.log.add_apply_failure(ApplyFailure(epoch, command.command_id, error, unchanged))
        self.events("kasmina_apply_failed", TELEMETRY_LEVEL_ERROR, command_id=command.command_id,
                    error=str(exc), model_unchanged=unchanged, breaker_opened=opened)


def command_note(command: AdaptationCommand | None, applied: bool, apply_reason: str) -> str:
    """The history's line for a boundary's command: Tamiyo's reason, and why it was not applied when
    a seed command was refused (vetoed, rejected, blocked), so the console and the report never
    show a germination that did not happen as if it had."""
    if command is None:
        return ""
    reason = command.annotations.get("reason", "")
    refused = command.command_type == COMMAND_SEED and not applied and apply_reason
    return f"{reason} [not applied: {apply_reason}]" if refused else reason


def incident_kind(rollback_reason: str) -> str:
    """The incident kind in a rollback's reason, which responses.py writes "<level> <kind>: <reason>"."""
    head = rollback_reason.split(":", 1)[0].split()
    return head[-1] if len(head) == 2 else ""


def structure_fingerprint(model: nn.Module) -> tuple[Any, ...]:
    """Names, shapes and trainability of every parameter: equal exactly when the structure is."""
    return tuple((n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters())
