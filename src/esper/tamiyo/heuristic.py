"""HeuristicTamiyo: a deterministic rule-based strategic controller.

Each epoch it reads a SystemStatePacket and answers exactly one AdaptationCommand. Rules, in
priority order (the first that fires wins; seeds are considered oldest first, ties by seed id):

1. Cull harm: a seed in BLENDING, SHADOWING or PROBATIONARY whose `val_loss_delta` metric
   (relative val-loss change since blending began) exceeds `cull_tolerance` is culled.
2. Advance the lifecycle of a live seed:
   GERMINATED -> START_TRAINING at once;
   TRAINING -> START_GRAFTING once `epochs_in_stage >= min_training_epochs`;
   BLENDING -> STABILIZE once metric `alpha >= 1`;
   SHADOWING -> FINE_TUNE once `epochs_in_stage >= shadow_epochs`;
   PROBATIONARY -> FOSSILIZE once `epochs_in_stage >= probation_epochs` and
   `val_loss_delta <= fossilize_tolerance` (no harm).
3. Germinate: if validation loss has plateaued (relative improvement of the best of the last
   `plateau_window` epochs over the epoch before them is below `plateau_threshold`), fewer than
   `max_live_seeds` seeds are live, `cooldown_epochs` have passed since the last germination,
   the packet is not in conservative mode, and a slot is free (a DORMANT SeedState, whose
   seed_id is the slot name): GERMINATE the free slot with the lowest layer_depth, using
   `default_blueprint`.
4. Otherwise a no-op command.

Conservative mode only blocks germination; culling and advancing still happen, since they
reduce or settle risk. Output depends only on the packets seen (history is `state_dict()`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from esper.leyline import (
    SEED_OP_CULL,
    SEED_OP_FINE_TUNE,
    SEED_OP_FOSSILIZE,
    SEED_OP_GERMINATE,
    SEED_OP_STABILIZE,
    SEED_OP_START_GRAFTING,
    SEED_OP_START_TRAINING,
    SEED_STAGE_BLENDING,
    SEED_STAGE_DORMANT,
    SEED_STAGE_GERMINATED,
    SEED_STAGE_PROBATIONARY,
    SEED_STAGE_SHADOWING,
    SEED_STAGE_TRAINING,
    AdaptationCommand,
    SeedLifecycleStage,
    SeedOperation,
    SeedState,
    SystemStatePacket,
    noop_command,
    seed_command,
)

ISSUER = "tamiyo"
_LIVE = frozenset(
    {SEED_STAGE_GERMINATED, SEED_STAGE_TRAINING, SEED_STAGE_BLENDING, SEED_STAGE_SHADOWING, SEED_STAGE_PROBATIONARY}
)
_APPLIED = frozenset({SEED_STAGE_BLENDING, SEED_STAGE_SHADOWING, SEED_STAGE_PROBATIONARY})


class TamiyoConfig(BaseModel):
    """Thresholds of the heuristic policy. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plateau_window: int = Field(default=3, ge=1)
    """Epochs over which validation-loss improvement is measured."""

    plateau_threshold: float = Field(default=0.01, ge=0.0)
    """Relative improvement below which the loss counts as plateaued (0.01 = 1 %)."""

    max_live_seeds: int = Field(default=1, ge=0)
    """No germination while this many seeds are live (GERMINATED..PROBATIONARY)."""

    cooldown_epochs: int = Field(default=3, ge=0)
    """Epochs that must pass after a germination before the next one."""

    default_blueprint: str = "residual_mlp"
    """Blueprint id sent with GERMINATE."""

    min_training_epochs: int = Field(default=2, ge=0)
    """Epochs a seed spends in TRAINING before START_GRAFTING is requested."""

    shadow_epochs: int = Field(default=1, ge=0)
    """Epochs in SHADOWING before FINE_TUNE."""

    probation_epochs: int = Field(default=2, ge=0)
    """Epochs in PROBATIONARY before FOSSILIZE is considered."""

    fossilize_tolerance: float = Field(default=0.01, ge=0.0)
    """FOSSILIZE only if val_loss_delta <= this (no harm)."""

    cull_tolerance: float = Field(default=0.05, ge=0.0)
    """Cull an applied seed whose val_loss_delta exceeds this (harm)."""


def _metric(seed: SeedState, name: str, default: float = 0.0) -> float:
    return seed.metrics[name] if name in seed.metrics else default


def _name(op: int) -> str:
    return SeedOperation.Name(op)  # type: ignore[arg-type]


class HeuristicTamiyo:
    """The rule-based controller; see the module docstring for the rules. Implements TamiyoClient."""

    def __init__(self, config: TamiyoConfig | None = None) -> None:
        self._config = config or TamiyoConfig()
        self._val_losses: list[float] = []
        self._last_germination_epoch: int | None = None

    @property
    def config(self) -> TamiyoConfig:
        return self._config

    def evaluate_epoch(self, packet: SystemStatePacket) -> AdaptationCommand:
        """One command for this epoch's packet (records the packet's val loss in the history)."""
        self._record(packet.validation_loss)
        seeds = sorted((s for s in packet.seed_states if s.stage in _LIVE), key=lambda s: (-s.age_epochs, s.seed_id))
        command = self._cull(seeds) or self._advance(seeds) or self._germinate(packet, seeds)
        if command is not None:
            return command
        return noop_command(issued_by=ISSUER, reason=self._idle_reason(packet, seeds))

    def _record(self, val_loss: float) -> None:
        self._val_losses.append(float(val_loss))
        # Only the last window (+1 reference epoch) is ever read.
        del self._val_losses[: -(self._config.plateau_window + 1)]

    def _cull(self, seeds: Sequence[SeedState]) -> AdaptationCommand | None:
        for seed in seeds:
            delta = _metric(seed, "val_loss_delta")
            if seed.stage in _APPLIED and delta > self._config.cull_tolerance:
                reason = f"cull: val_loss_delta {delta:.4f} > cull_tolerance {self._config.cull_tolerance}"
                return self._seed_op(SEED_OP_CULL, seed.seed_id, reason)
        return None

    def _advance(self, seeds: Sequence[SeedState]) -> AdaptationCommand | None:
        cfg = self._config
        for seed in seeds:
            epochs = _metric(seed, "epochs_in_stage")
            op: int | None = None
            if seed.stage == SEED_STAGE_GERMINATED:
                op = SEED_OP_START_TRAINING
            elif seed.stage == SEED_STAGE_TRAINING and epochs >= cfg.min_training_epochs:
                op = SEED_OP_START_GRAFTING
            elif seed.stage == SEED_STAGE_BLENDING and _metric(seed, "alpha") >= 1.0:
                op = SEED_OP_STABILIZE
            elif seed.stage == SEED_STAGE_SHADOWING and epochs >= cfg.shadow_epochs:
                op = SEED_OP_FINE_TUNE
            elif (
                seed.stage == SEED_STAGE_PROBATIONARY
                and epochs >= cfg.probation_epochs
                and _metric(seed, "val_loss_delta") <= cfg.fossilize_tolerance
            ):
                op = SEED_OP_FOSSILIZE
            if op is not None:
                stage = SeedLifecycleStage.Name(seed.stage)
                return self._seed_op(op, seed.seed_id, f"advance: {stage} after {epochs:.0f} epochs in stage")
        return None

    def _germinate(self, packet: SystemStatePacket, seeds: Sequence[SeedState]) -> AdaptationCommand | None:
        cfg = self._config
        free = sorted((s for s in packet.seed_states if s.stage == SEED_STAGE_DORMANT), key=lambda s: s.layer_depth)
        if packet.conservative_mode or not free or len(seeds) >= cfg.max_live_seeds or not self._cooled(packet):
            return None
        improvement = self._plateau_improvement()
        if improvement is None or improvement >= cfg.plateau_threshold:
            return None
        self._last_germination_epoch = packet.current_epoch
        reason = f"germinate: val loss improved {improvement:.4f} < plateau_threshold {cfg.plateau_threshold}"
        return seed_command(
            SEED_OP_GERMINATE, issued_by=ISSUER, target_seed_id=free[0].seed_id,
            blueprint_id=cfg.default_blueprint, reason=reason,
        )

    def _cooled(self, packet: SystemStatePacket) -> bool:
        last = self._last_germination_epoch
        return last is None or packet.current_epoch - last >= self._config.cooldown_epochs

    def _plateau_improvement(self) -> float | None:
        """Relative improvement of the best recent loss over the epoch before the window."""
        window = self._config.plateau_window
        if len(self._val_losses) < window + 1:
            return None
        reference = self._val_losses[-(window + 1)]
        best = min(self._val_losses[-window:])
        return (reference - best) / max(abs(reference), 1e-12)

    def _idle_reason(self, packet: SystemStatePacket, seeds: Sequence[SeedState]) -> str:
        if packet.conservative_mode:
            return "noop: conservative mode blocks germination"
        if seeds:
            return f"noop: {len(seeds)} live seed(s) waiting for their next gate"
        return "noop: no plateau, no free slot, or cooling down"

    def _seed_op(self, op: int, seed_id: str, reason: str) -> AdaptationCommand:
        return seed_command(op, issued_by=ISSUER, target_seed_id=seed_id, reason=f"{_name(op)} {seed_id}: {reason}")

    def state_dict(self) -> dict[str, Any]:
        return {"val_losses": list(self._val_losses), "last_germination_epoch": self._last_germination_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._val_losses = [float(v) for v in state.get("val_losses", [])]
        last = state.get("last_germination_epoch")
        self._last_germination_epoch = None if last is None else int(last)
