"""The seed lifecycle: per-seed record, the transition table and the gates.

Stages and operations are Leyline's `SeedLifecycleStage` and `SeedOperation`. GERMINATE is
slot-level (it creates the record) and handled by the layer; every other operation is a row of
`TRANSITIONS`: the stages it may start from and the stage it leads to (None: stays put). A row's
gate, if any, must also pass. `check_transition` decides without mutating anything, so a
rejected command changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from esper.kasmina.blueprints import BlueprintSpec
from esper.kasmina.config import KasminaConfig
from esper.leyline import (
    SEED_OP_CANCEL,
    SEED_OP_CULL,
    SEED_OP_EVALUATE,
    SEED_OP_FINE_TUNE,
    SEED_OP_FOSSILIZE,
    SEED_OP_STABILIZE,
    SEED_OP_START_GRAFTING,
    SEED_OP_START_TRAINING,
    SEED_STAGE_BLENDING,
    SEED_STAGE_CULLED,
    SEED_STAGE_FOSSILIZED,
    SEED_STAGE_GERMINATED,
    SEED_STAGE_PROBATIONARY,
    SEED_STAGE_SHADOWING,
    SEED_STAGE_TRAINING,
    SeedLifecycleStage,
    SeedOperation,
)

LIVE_STAGES = frozenset(
    {SEED_STAGE_GERMINATED, SEED_STAGE_TRAINING, SEED_STAGE_BLENDING, SEED_STAGE_SHADOWING, SEED_STAGE_PROBATIONARY}
)
"""Stages of a seed that still occupies its slot and has an own loss."""

FULL_STRENGTH_STAGES = frozenset({SEED_STAGE_SHADOWING, SEED_STAGE_PROBATIONARY, SEED_STAGE_FOSSILIZED})
"""Stages whose seed is applied at alpha = 1 in the main forward."""

APPLIED_STAGES = FULL_STRENGTH_STAGES | {SEED_STAGE_BLENDING}
"""Stages whose seed is evaluated in the main forward (GERMINATED/TRAINING seeds cost nothing there)."""


def stage_name(stage: int) -> str:
    return SeedLifecycleStage.Name(stage)  # type: ignore[arg-type]


def op_name(op: int) -> str:
    return SeedOperation.Name(op)  # type: ignore[arg-type]


@dataclass
class SeedRecord:
    """Everything Kasmina knows about one seed besides its weights. Plain values only."""

    seed_id: str
    slot: str
    blueprint: str
    shape: tuple[int, ...]
    stage: int
    created_epoch: int
    hidden: int
    adapter_dim: int
    rank: int = 8
    head_dim: int = 16
    causal: bool = True
    history: list[tuple[int, int]] = field(default_factory=list)  # (epoch, stage entered)
    steps_in_stage: int = 0
    epochs_in_stage: int = 0
    total_steps: int = 0
    blend_step: int = 0
    alpha: float = 0.0
    eval_steps_left: int = 0
    age_epochs: int = 0
    val_loss_at_stage_entry: float | None = None
    val_loss_at_blend_start: float | None = None
    val_loss_at_germination: float | None = None

    @property
    def live(self) -> bool:
        return self.stage in LIVE_STAGES

    @property
    def in_evaluation(self) -> bool:
        return self.eval_steps_left > 0

    def spec(self) -> BlueprintSpec:
        """The widths this seed was built with (a rebuild from them gives the same architecture)."""
        return BlueprintSpec(self.hidden, self.adapter_dim, self.rank, self.head_dim, self.causal)

    def reference_val_loss(self) -> float | None:
        """The val loss the seed's effect is judged against: at blend start once blending began."""
        if self.val_loss_at_blend_start is not None:
            return self.val_loss_at_blend_start
        return self.val_loss_at_germination

    def enter(self, stage: int, epoch: int, val_loss: float | None) -> None:
        self.stage = stage
        self.history.append((epoch, stage))
        self.steps_in_stage = 0
        self.epochs_in_stage = 0
        self.val_loss_at_stage_entry = val_loss


@dataclass(frozen=True)
class Transition:
    sources: frozenset[int]
    target: int | None  # None: the stage does not change (EVALUATE)


TRANSITIONS: dict[int, Transition] = {
    SEED_OP_START_TRAINING: Transition(frozenset({SEED_STAGE_GERMINATED}), SEED_STAGE_TRAINING),
    SEED_OP_START_GRAFTING: Transition(frozenset({SEED_STAGE_TRAINING}), SEED_STAGE_BLENDING),
    SEED_OP_STABILIZE: Transition(frozenset({SEED_STAGE_BLENDING}), SEED_STAGE_SHADOWING),
    SEED_OP_EVALUATE: Transition(frozenset({SEED_STAGE_SHADOWING, SEED_STAGE_PROBATIONARY}), None),
    SEED_OP_FINE_TUNE: Transition(frozenset({SEED_STAGE_SHADOWING}), SEED_STAGE_PROBATIONARY),
    SEED_OP_FOSSILIZE: Transition(frozenset({SEED_STAGE_PROBATIONARY}), SEED_STAGE_FOSSILIZED),
    SEED_OP_CULL: Transition(LIVE_STAGES, SEED_STAGE_CULLED),
    SEED_OP_CANCEL: Transition(frozenset({SEED_STAGE_GERMINATED, SEED_STAGE_TRAINING}), SEED_STAGE_CULLED),
}

Gate = Callable[[SeedRecord, KasminaConfig, float | None], str | None]


def _gate_grafting(seed: SeedRecord, config: KasminaConfig, val_loss: float | None) -> str | None:
    if seed.steps_in_stage < config.min_training_steps:
        return (
            f"gate min_training_steps failed: {seed.seed_id} has trained {seed.steps_in_stage} isolated steps, "
            f"needs {config.min_training_steps}; keep training or lower kasmina.min_training_steps"
        )
    return None


def _gate_stabilize(seed: SeedRecord, config: KasminaConfig, val_loss: float | None) -> str | None:
    if seed.alpha < 1.0:
        return (
            f"gate alpha_complete failed: {seed.seed_id} alpha is {seed.alpha:.4f} after "
            f"{seed.blend_step}/{config.blend_steps} blend steps; STABILIZE once alpha reaches 1"
        )
    return None


def _gate_evaluate(seed: SeedRecord, config: KasminaConfig, val_loss: float | None) -> str | None:
    if seed.in_evaluation:
        return f"{seed.seed_id} is already in an evaluation window ({seed.eval_steps_left} steps left)"
    return None


def _gate_fossilize(seed: SeedRecord, config: KasminaConfig, val_loss: float | None) -> str | None:
    if seed.alpha < 1.0:
        return f"gate alpha_complete failed: {seed.seed_id} alpha is {seed.alpha:.4f}, FOSSILIZE needs alpha == 1"
    base = seed.val_loss_at_blend_start
    if base is None or val_loss is None:
        return (
            f"gate no_harm failed: {seed.seed_id} has no validation loss from when blending began or since; "
            "call on_epoch_end before grafting and before fossilizing"
        )
    limit = base * (1.0 + config.fossilize_tolerance)
    if not val_loss <= limit:
        return (
            f"gate no_harm failed: val loss {val_loss:.6g} > {limit:.6g} (val loss at blend start {base:.6g} "
            f"* (1 + fossilize_tolerance {config.fossilize_tolerance})); cull the seed or keep it in probation"
        )
    return None


GATES: dict[int, Gate] = {
    SEED_OP_START_GRAFTING: _gate_grafting,
    SEED_OP_STABILIZE: _gate_stabilize,
    SEED_OP_EVALUATE: _gate_evaluate,
    SEED_OP_FOSSILIZE: _gate_fossilize,
}


def check_transition(seed: SeedRecord, op: int, config: KasminaConfig, val_loss: float | None) -> str | None:
    """None if `op` may be applied to `seed` now, else the rule that forbids it (nothing is mutated)."""
    rule = TRANSITIONS.get(op)
    if rule is None:
        return f"seed operation {op_name(op)} is not a transition of an existing seed"
    if seed.stage not in rule.sources:
        allowed = ", ".join(sorted(stage_name(s) for s in rule.sources))
        return (
            f"illegal transition: {op_name(op)} is not allowed for {seed.seed_id} in {stage_name(seed.stage)} "
            f"(allowed from: {allowed})"
        )
    gate = GATES.get(op)
    return gate(seed, config, val_loss) if gate is not None else None
