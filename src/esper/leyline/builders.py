"""Builders that stamp version, ids and timestamps so no caller forgets them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from esper.leyline import leyline_pb2 as pb

LEYLINE_VERSION = 1


def new_id() -> str:
    """A fresh random id (uuid4 hex, 32 chars)."""
    return uuid.uuid4().hex


def now_timestamp() -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def system_state_packet(
    *,
    epoch: int,
    global_step: int,
    training_loss: float,
    validation_loss: float,
    validation_accuracy: float,
    seed_states: Sequence[pb.SeedState] = (),
    training_metrics: Mapping[str, float] | None = None,
    hardware: pb.HardwareContext | None = None,
    run_id: str = "",
    experiment_name: str = "",
    conservative_mode: bool = False,
    source_subsystem: str = "tolaria",
) -> pb.SystemStatePacket:
    """A complete SystemStatePacket with version, packet id and timestamp stamped."""
    packet = pb.SystemStatePacket(
        version=LEYLINE_VERSION,
        current_epoch=epoch,
        validation_accuracy=validation_accuracy,
        validation_loss=validation_loss,
        timestamp_ns=time.time_ns(),
        packet_id=new_id(),
        global_step=global_step,
        training_loss=training_loss,
        source_subsystem=source_subsystem,
        training_run_id=run_id,
        experiment_name=experiment_name,
        conservative_mode=conservative_mode,
    )
    if hardware is not None:
        packet.hardware_context.CopyFrom(hardware)
    if training_metrics:
        packet.training_metrics.update(training_metrics)
    packet.seed_states.extend(seed_states)
    return packet


def adaptation_command(
    command_type: int,
    *,
    issued_by: str,
    target_seed_id: str = "",
    reason: str = "",
    deadline_ms: int = 0,
    seed_operation: pb.CommandSeedOperation | None = None,
    annotations: Mapping[str, str] | None = None,
) -> pb.AdaptationCommand:
    """An AdaptationCommand with version, id and issue time stamped and a `reason` annotation."""
    cmd = pb.AdaptationCommand(
        version=LEYLINE_VERSION,
        command_id=new_id(),
        command_type=command_type,  # type: ignore[arg-type]
        target_seed_id=target_seed_id,
        execution_deadline_ms=deadline_ms,
        issued_by=issued_by,
    )
    cmd.issued_at.CopyFrom(now_timestamp())
    if seed_operation is not None:
        cmd.seed_operation.CopyFrom(seed_operation)
    if reason:
        cmd.annotations["reason"] = reason
    if annotations:
        cmd.annotations.update(annotations)
    return cmd


def seed_command(
    operation: int,
    *,
    issued_by: str,
    target_seed_id: str = "",
    blueprint_id: str = "",
    parameters: Mapping[str, float] | None = None,
    reason: str = "",
    annotations: Mapping[str, str] | None = None,
) -> pb.AdaptationCommand:
    """A COMMAND_SEED command carrying one seed operation."""
    op = pb.CommandSeedOperation(operation=operation, blueprint_id=blueprint_id)  # type: ignore[arg-type]
    if parameters:
        op.parameters.update(parameters)
    return adaptation_command(
        pb.COMMAND_SEED,
        issued_by=issued_by,
        target_seed_id=target_seed_id,
        reason=reason,
        seed_operation=op,
        annotations=annotations,
    )


def noop_command(*, issued_by: str, reason: str) -> pb.AdaptationCommand:
    """A command that asks for nothing: COMMAND_PAUSE with annotation `noop=true`.

    Leyline has no explicit no-op type; a PAUSE whose annotations say `noop` is the
    convention both Tamiyo and Tolaria use for "nothing to do this epoch".
    """
    return adaptation_command(pb.COMMAND_PAUSE, issued_by=issued_by, reason=reason, annotations={"noop": "true"})


def is_noop(command: pb.AdaptationCommand) -> bool:
    return command.command_type == pb.COMMAND_PAUSE and command.annotations.get("noop") == "true"
