"""The contracts between Tolaria, Kasmina, Tamiyo and Oona: the protocols Tolaria reaches them
through and the value types crossing them. None of the four owns this module.

Tolaria depends on these protocols only; the reference implementations in `esper.kasmina`,
`esper.tamiyo` and `esper.oona` are swappable. Every type crossing them is a Leyline message
or a plain value type defined here. May import: `esper.leyline`, torch. Never `esper.tolaria`,
`esper.kasmina`, `esper.tamiyo` or `esper.oona` (tests/test_import_direction.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from esper.leyline import AdaptationCommand, BusEnvelope, SeedState, SystemStatePacket


@dataclass(frozen=True)
class ApplyResult:
    """What applying one AdaptationCommand did.

    `ok=False` means nothing changed: the model, seeds and counters are exactly as before.
    Parameter names are fully qualified names from `model.named_parameters()`: `added_params`
    are new to the model or trainable again (a manifest load that unfreezes), `removed_params`
    left the model, `frozen_params` stay in the model but stopped training (fossilized). The
    rule everywhere: the optimizer holds exactly the trainable parameters, so a frozen parameter
    leaves it (group and state) and any change here means an optimizer rebuild.
    """

    ok: bool
    reason: str
    seed_id: str = ""
    added_params: tuple[str, ...] = ()
    removed_params: tuple[str, ...] = ()
    reshaped_params: tuple[str, ...] = ()
    frozen_params: tuple[str, ...] = ()

    @property
    def structure_changed(self) -> bool:
        return bool(self.added_params or self.removed_params or self.reshaped_params or self.frozen_params)


@dataclass(frozen=True)
class SeedLossTerm:
    """One seed's own loss contribution for the aggregator (see ARCHITECTURE.md, multi-seed semantics).

    `loss` is the task loss with this seed applied at full strength on *detached* host activations,
    so host parameters upstream of the slot receive no gradient from it.
    """

    seed_id: str
    stage: int  # SeedLifecycleStage
    alpha: float
    in_evaluation: bool
    loss: torch.Tensor
    batch_size: int
    param_names: tuple[str, ...] = field(default_factory=tuple)


@runtime_checkable
class TamiyoClient(Protocol):
    """A strategic controller: one packet in, one command out, once per epoch."""

    def evaluate_epoch(self, packet: SystemStatePacket) -> AdaptationCommand: ...


class EventSink(Protocol):
    """Where a component reports a notable event (Tolaria's telemetry collector's `emit_event`)."""

    def __call__(self, description: str, level: int = ..., priority: int = ..., **attributes: object) -> None: ...


@runtime_checkable
class StatefulComponent(Protocol):
    """Anything whose state belongs in a snapshot (`torch.nn.Module` and `torch.optim` style)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class ExecutionLayer(Protocol):
    """Kasmina as Tolaria sees it."""

    @property
    def model(self) -> nn.Module: ...

    def apply_command(self, command: AdaptationCommand) -> ApplyResult: ...

    def on_step(self) -> None: ...

    def on_epoch_end(self, epoch: int, val_loss: float, val_accuracy: float) -> None: ...

    def export_seed_states(self) -> list[SeedState]: ...

    def own_loss_terms(self, compute_loss: Callable[[], torch.Tensor], batch_size: int) -> list[SeedLossTerm]:
        """One term per live seed: `compute_loss()` (the task's forward and loss on this batch) run with
        that seed in its own-loss mode."""
        ...

    def manifest(self) -> dict[str, Any]: ...

    def load_manifest(self, manifest: Mapping[str, Any]) -> ApplyResult: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class BatchPublisher(Protocol):
    """A bus that publishes many envelopes in one round trip (Redis pipelining)."""

    def publish_many(self, stream: str, envelopes: list[BusEnvelope]) -> list[str]: ...


@runtime_checkable
class SpoolingBusLike(Protocol):
    """A bus that keeps locally what it could not publish, and reports it (`oona.SpoolingBus`)."""

    spooled: int

    def summary(self) -> dict[str, Any]: ...


class OonaBus(Protocol):
    """A message bus carrying Leyline envelopes on named streams."""

    def publish(self, stream: str, envelope: BusEnvelope) -> str: ...

    def close(self) -> None: ...
