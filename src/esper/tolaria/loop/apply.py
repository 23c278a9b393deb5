"""Applying one command: journal it, apply it through Kasmina, rebuild the optimizer for what changed.

A raise from the execution layer is recorded (run log, event, Kasmina's breaker) and the
boundary goes on: the contract is that a failed apply leaves the model unchanged, and the
structure is compared before and after to say whether it did.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from esper.contracts import EventSink, ExecutionLayer
from esper.leyline import TELEMETRY_LEVEL_ERROR, TELEMETRY_LEVEL_INFO, TELEMETRY_LEVEL_WARNING, AdaptationCommand
from esper.tolaria.checkpoint.journal import CommandJournal
from esper.tolaria.control.breakers import CircuitBreaker
from esper.tolaria.control.optimizer import DynamicOptimizerManager
from esper.tolaria.observe.runlog import ApplyFailure, RunLog
from esper.tolaria.state.position import TrainerState


class CommandApplier:
    def __init__(self, kasmina: ExecutionLayer, optim: DynamicOptimizerManager, breaker: CircuitBreaker,
                 journal: CommandJournal, log: RunLog, events: EventSink, position: TrainerState) -> None:
        self.kasmina, self.optim, self.breaker = kasmina, optim, breaker
        self.journal, self.log, self.events, self.position = journal, log, events, position

    def apply(self, command: AdaptationCommand, epoch: int, *, journal: bool = True) -> tuple[bool, str]:
        """Apply `command`; returns (applied, reason). The command is journaled in the WAL first
        (durable), so a resume can replay it; a replay passes `journal=False`."""
        if journal:
            self.journal.record(command, epoch=epoch, step=self.position.global_step)
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
        return True, result.reason

    def _record_failure(self, command: AdaptationCommand, epoch: int, exc: Exception, *, unchanged: bool) -> None:
        error = f"{type(exc).__name__}: {exc}"
        opened = self.breaker.record_failure(error)
        self.log.add_apply_failure(ApplyFailure(epoch, command.command_id, error, unchanged))
        self.events("kasmina_apply_failed", TELEMETRY_LEVEL_ERROR, command_id=command.command_id,
                    error=str(exc), model_unchanged=unchanged, breaker_opened=opened)


def structure_fingerprint(model: nn.Module) -> tuple[Any, ...]:
    """Names, shapes and trainability of every parameter: equal exactly when the structure is."""
    return tuple((n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters())
