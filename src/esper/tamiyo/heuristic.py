"""HeuristicTamiyo: a deterministic rule-based strategic controller.

Each epoch it reads a SystemStatePacket and answers exactly one AdaptationCommand. Rules, in
priority order (the first that fires wins; seeds are considered oldest first, ties by seed id):

0. Learn from rollbacks first: a packet's `rolled_back_commands` are mutations Tolaria undid.
   Only those undone by a validation failure (`incident_kind` in `_BLAMES_THE_MODEL`: a loss or
   accuracy collapse) teach anything; a NaN or a spike in a step is the data's or the machine's
   fault, and its replay must end where a run without it ends. A GERMINATE so undone counts as a
   cull in its slot and restarts the cooldown; a seed whose lifecycle command was so undone is
   culled at the next chance (before rule 1), rather than walked into the same failure again;
   unless the seed is gone from the packet (the rollback undid its GERMINATE as well).
1. Cull harm: a seed in BLENDING, SHADOWING or PROBATIONARY whose `val_loss_delta` metric
   (relative val-loss change since blending began) exceeds `cull_tolerance` is culled; so is a
   seed at full strength (SHADOWING, PROBATIONARY) whose counterfactual attribution says the
   model is better without it: `attribution_loss` (val loss without the seed minus with it)
   below `-cull_attribution` x the val loss; and a PROBATIONARY seed still not paying
   (`attribution_loss <= fossilize_attribution` x val loss) `probation_patience` epochs after
   its probation ended.
2. Advance the lifecycle of a live seed:
   GERMINATED -> START_TRAINING at once;
   TRAINING -> START_GRAFTING once `epochs_in_stage >= min_training_epochs`;
   BLENDING -> STABILIZE once metric `alpha >= 1`;
   SHADOWING -> FINE_TUNE once `epochs_in_stage >= shadow_epochs`;
   PROBATIONARY -> FOSSILIZE once `epochs_in_stage >= probation_epochs`,
   `val_loss_delta <= fossilize_tolerance` (no harm) and, where the packet carries it, the
   seed's `attribution_loss > fossilize_attribution` x val loss (it pays for itself).
3. Germinate: if validation loss has plateaued, fewer than `max_live_seeds` seeds are live,
   `cooldown_epochs` have passed since the last germination, the packet is not in conservative
   mode, and a slot is free (a DORMANT SeedState, whose seed_id is the slot name) whose seed fits
   the parameter budget (`max_params`: the packet's `param_count` plus the slot's
   `germination_params`) while the training FLOPs spent (`flops_total`) are under `max_flops`:
   GERMINATE the fitting free slot where the fewest seeds were culled
   (a culled seed is the attribution's verdict on its slot), then the lowest layer_depth, with
   `default_blueprint` (empty: Kasmina picks by the slot's activation shape). Plateaued means
   either, with `gain` = the loss of the epoch before
   the last `plateau_window` epochs minus the best loss of those epochs:
   - `gain / that loss < plateau_threshold` (the loss has stalled), or
   - `gain < progress_threshold * (phase start loss - best of the window)`: returns have
     diminished, judged against the progress made since the growth phase began (the run's first
     epoch, then each germination). Why both: a loss falling towards 0 (a CNN fitting digits)
     keeps improving a few percent relative to its own size for hundreds of epochs, so the first
     test alone never fires on it, while the second is blind to the loss's scale.
4. Otherwise a no-op command whose reason starts with the condition that blocked germination
   (conservative mode, live seeds, no free slot, over FLOP budget, over budget, cooling down, no
   plateau) and gives
   the numbers.

Conservative mode only blocks germination; culling and advancing still happen, since they
reduce or settle risk. Output depends only on the packets seen (history is `state_dict()`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
WIDEN = "net2wider"  # Kasmina's blueprint id of a widening (esper.kasmina.widen; Tamiyo imports only Leyline)
_LIVE = frozenset(
    {SEED_STAGE_GERMINATED, SEED_STAGE_TRAINING, SEED_STAGE_BLENDING, SEED_STAGE_SHADOWING, SEED_STAGE_PROBATIONARY}
)
_APPLIED = frozenset({SEED_STAGE_BLENDING, SEED_STAGE_SHADOWING, SEED_STAGE_PROBATIONARY})
_FULL = frozenset({SEED_STAGE_SHADOWING, SEED_STAGE_PROBATIONARY})  # applied at alpha 1
# Incidents a mutation can cause: validation got worse. Step faults (NaN, spikes) are not its doing.
_BLAMES_THE_MODEL = frozenset({"loss_collapse", "accuracy_collapse", "accuracy_floor", "accuracy_nonfinite"})


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

    default_blueprint: str = ""
    """Blueprint id sent with GERMINATE; empty lets Kasmina pick by the slot's activation shape."""

    progress_threshold: float = Field(default=0.01, ge=0.0)
    """Plateau also when the window's gain is below this fraction of the gain since the growth phase
    began (run start or the last germination); 0 turns this test off."""

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

    cull_attribution: float = Field(default=0.02, ge=0.0)
    """Cull a full-strength seed whose removal lowers val loss by more than this fraction of it."""

    fossilize_attribution: float = Field(default=0.0, ge=0.0)
    """FOSSILIZE only a seed whose removal raises val loss by more than this fraction of it."""

    probation_patience: int = Field(default=4, ge=0)
    """Epochs past `probation_epochs` a seed that does not pay may wait before it is culled."""

    max_params: int = Field(default=0, ge=0)
    """Parameter budget of the grown model: no germination that would exceed it (0: no budget)."""

    growth: Literal["seed", "widen"] = "seed"
    """How to grow at a plateau: germinate a seed in a free slot, or widen the next of `widen_layers`
    (a `net2wider` GERMINATE: Kasmina widens the host layer in place, function-preserving; no seed,
    no lifecycle, so the seed rules and limits do not apply to it)."""

    widen_layers: list[str] = Field(default_factory=list)
    """Host layers to widen in turn when `growth = "widen"` (each listed in `kasmina.widen`)."""

    max_flops: float = Field(default=0.0, ge=0.0)
    """Training-FLOP budget: no germination once the packet's `flops_total` (training FLOPs up to the
    last boundary) reaches it (0: no budget); growing late costs more than it can pay back."""

    @model_validator(mode="after")
    def _widen_needs_layers(self) -> TamiyoConfig:
        if self.growth == "widen" and not self.widen_layers:
            raise ValueError('tamiyo.growth = "widen" needs tamiyo.widen_layers: the host layers to widen in turn')
        return self



def _metric(seed: SeedState, name: str, default: float = 0.0) -> float:
    return seed.metrics[name] if name in seed.metrics else default


def _attribution_share(seed: SeedState, val_loss: float) -> float | None:
    """The seed's loss attribution as a fraction of the val loss; None where the packet has none."""
    if "attribution_loss" not in seed.metrics:
        return None
    return seed.metrics["attribution_loss"] / max(abs(val_loss), 1e-12)


def _pays(seed: SeedState, val_loss: float, threshold: float) -> bool:
    """Removing the seed raises val loss by more than `threshold` of it (True where unmeasured)."""
    share = _attribution_share(seed, val_loss)
    return share is None or share > threshold


def _name(op: int) -> str:
    return SeedOperation.Name(op)  # type: ignore[arg-type]


class HeuristicTamiyo:
    """The rule-based controller; see the module docstring for the rules. Implements TamiyoClient."""

    def __init__(self, config: TamiyoConfig | None = None) -> None:
        self._config = config or TamiyoConfig()
        self._val_losses: list[float] = []
        self._last_germination_epoch: int | None = None
        self._phase_start_loss: float | None = None  # val loss when the current growth phase began
        self._slot_culls: dict[int, int] = {}  # slot index -> seeds culled there
        self._doomed: set[str] = set()  # seeds whose lifecycle command a rollback undid
        self._widened = 0  # widenings asked for (growth = "widen" takes widen_layers in turn)

    @property
    def config(self) -> TamiyoConfig:
        return self._config

    def evaluate_epoch(self, packet: SystemStatePacket) -> AdaptationCommand:
        """One command for this epoch's packet (records the packet's val loss in the history)."""
        self._record(packet.validation_loss)
        self._learn(packet)
        seeds = sorted((s for s in packet.seed_states if s.stage in _LIVE), key=lambda s: (-s.age_epochs, s.seed_id))
        command = self._cull(seeds, packet.validation_loss) or self._advance(seeds, packet.validation_loss)
        if command is not None:
            return command
        blocker = self._germination_blocker(packet, seeds)
        if blocker is None:
            return self._germinate(packet)
        return noop_command(issued_by=ISSUER, reason=f"noop: {blocker}")

    def _record(self, val_loss: float) -> None:
        self._val_losses.append(float(val_loss))
        if self._phase_start_loss is None:
            self._phase_start_loss = float(val_loss)
        # Only the last window (+1 reference epoch) is ever read.
        del self._val_losses[: -(self._config.plateau_window + 1)]

    def _learn(self, packet: SystemStatePacket) -> None:
        """Rule 0: what the packet's rolled-back commands teach."""
        depth = {s.seed_id: s.layer_depth for s in packet.seed_states if s.stage == SEED_STAGE_DORMANT}
        # A seed the rollback removed altogether (its GERMINATE undone too) is not doomed: its id is
        # free again, and the next seed germinated may get it.
        present = {s.seed_id for s in packet.seed_states if s.stage != SEED_STAGE_DORMANT}
        for undone in packet.rolled_back_commands:
            if undone.incident_kind not in _BLAMES_THE_MODEL:
                continue
            if undone.operation == SEED_OP_GERMINATE:
                slot = depth.get(undone.target_seed_id)
                if slot is not None:
                    self._slot_culls[slot] = self._slot_culls.get(slot, 0) + 1
                self._last_germination_epoch = packet.current_epoch
            elif undone.target_seed_id in present:
                self._doomed.add(undone.target_seed_id)

    def _cull(self, seeds: Sequence[SeedState], val_loss: float) -> AdaptationCommand | None:
        for seed in seeds:
            if seed.seed_id in self._doomed:
                self._doomed.discard(seed.seed_id)
                return self._seed_op(SEED_OP_CULL, seed.seed_id, "cull: a rollback undid its last lifecycle command")
        for seed in seeds:
            reason = self._cull_reason(seed, val_loss)
            if reason is not None:
                self._slot_culls[int(_metric(seed, "slot_index"))] = \
                    self._slot_culls.get(int(_metric(seed, "slot_index")), 0) + 1
                return self._seed_op(SEED_OP_CULL, seed.seed_id, reason)
        return None

    def _cull_reason(self, seed: SeedState, val_loss: float) -> str | None:
        cfg, delta = self._config, _metric(seed, "val_loss_delta")
        if seed.stage in _APPLIED and delta > cfg.cull_tolerance:
            return f"cull: val_loss_delta {delta:.4f} > cull_tolerance {cfg.cull_tolerance}"
        share = _attribution_share(seed, val_loss)
        if share is None or seed.stage not in _FULL:
            return None
        if share < -cfg.cull_attribution:
            return (f"cull: without it val loss is {-share:.4f} of itself lower (attribution_loss "
                    f"{_metric(seed, 'attribution_loss'):.6g}), beyond cull_attribution {cfg.cull_attribution}")
        waited = _metric(seed, "epochs_in_stage") - cfg.probation_epochs
        if seed.stage == SEED_STAGE_PROBATIONARY and share <= cfg.fossilize_attribution \
                and waited >= cfg.probation_patience:
            return (f"cull: does not pay: attribution {share:.4f} of val loss <= fossilize_attribution "
                    f"{cfg.fossilize_attribution} for {waited:.0f} epochs past probation")
        return None

    def _advance(self, seeds: Sequence[SeedState], val_loss: float) -> AdaptationCommand | None:
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
                and _pays(seed, val_loss, cfg.fossilize_attribution)
            ):
                op = SEED_OP_FOSSILIZE
            if op is not None:
                stage = SeedLifecycleStage.Name(seed.stage)
                return self._seed_op(op, seed.seed_id, f"advance: {stage} after {epochs:.0f} epochs in stage")
        return None

    def _germination_blocker(self, packet: SystemStatePacket, seeds: Sequence[SeedState]) -> str | None:
        """Why germination may not happen this epoch (None: it may), with the numbers that decided."""
        cfg, last = self._config, self._last_germination_epoch
        if packet.conservative_mode:
            return "conservative mode blocks germination"
        if len(seeds) >= cfg.max_live_seeds and cfg.growth == "seed":
            return (f"live seeds: {len(seeds)} live seed(s) (max_live_seeds {cfg.max_live_seeds}) "
                    "waiting for their next gate")
        widening = cfg.growth == "widen"
        if not widening and not any(s.stage == SEED_STAGE_DORMANT for s in packet.seed_states):
            return "no free slot (no DORMANT seed state in the packet)"
        spent = packet.training_metrics.get("flops_total", 0.0)
        if cfg.max_flops and spent >= cfg.max_flops:
            return f"over FLOP budget: {spent:.4g} training FLOPs spent >= max_flops {cfg.max_flops:.4g}"
        if widening and cfg.max_params and packet.training_metrics.get("param_count", 0.0) >= cfg.max_params:
            have = packet.training_metrics["param_count"]
            return f"over budget: param_count {have:.0f} >= max_params {cfg.max_params}"
        if not widening and not self._fitting_slots(packet):
            return (f"over budget: every free slot's seed would take param_count "
                    f"{packet.training_metrics.get('param_count', 0.0):.0f} past max_params {cfg.max_params}")
        if last is not None and packet.current_epoch - last < cfg.cooldown_epochs:
            return f"cooling down: last germination at epoch {last}, cooldown_epochs {cfg.cooldown_epochs}"
        blocker = self._plateau_blocker()
        return None if blocker is None else f"no plateau: {blocker}"

    def _fitting_slots(self, packet: SystemStatePacket) -> list[SeedState]:
        """Free slots whose seed fits `max_params`, best first: fewest culls there, then shallowest."""
        free = [s for s in packet.seed_states if s.stage == SEED_STAGE_DORMANT]
        if self._config.max_params:
            have = packet.training_metrics.get("param_count", 0.0)
            free = [s for s in free if have + _metric(s, "germination_params") <= self._config.max_params]
        return sorted(free, key=lambda s: (self._slot_culls.get(s.layer_depth, 0), s.layer_depth))

    def _plateau_blocker(self) -> str | None:
        """None once the loss has plateaued by either test of the module docstring, else why not."""
        cfg, window = self._config, self._config.plateau_window
        if len(self._val_losses) < window + 1:
            return f"{len(self._val_losses)} of the {window + 1} epochs of val loss the plateau test needs"
        reference, best = self._val_losses[-(window + 1)], min(self._val_losses[-window:])
        gain = reference - best
        relative = gain / max(abs(reference), 1e-12)
        if relative < cfg.plateau_threshold:
            return None
        phase = (self._phase_start_loss if self._phase_start_loss is not None else reference) - best
        if phase > 0 and gain < cfg.progress_threshold * phase:
            return None
        share = f"{gain / phase:.4f}" if phase > 0 else "n/a"
        return (
            f"val loss still improving: {relative:.4f} relative over {window} epochs >= plateau_threshold "
            f"{cfg.plateau_threshold}, and {share} of the progress since the growth phase began >= "
            f"progress_threshold {cfg.progress_threshold}"
        )

    def _germinate(self, packet: SystemStatePacket) -> AdaptationCommand:
        cfg, window = self._config, self._config.plateau_window
        free = self._fitting_slots(packet)
        reference, best = self._val_losses[-(window + 1)], min(self._val_losses[-window:])
        reason = (
            f"germinate: val loss plateaued (best of the last {window} epochs {best:.6g}, "
            f"epoch before them {reference:.6g}, growth phase began at {self._phase_start_loss:.6g})"
        )
        self._last_germination_epoch = packet.current_epoch
        self._phase_start_loss = float(packet.validation_loss)  # the next phase is judged from here
        if cfg.growth == "widen":
            layer = cfg.widen_layers[self._widened % len(cfg.widen_layers)]
            self._widened += 1
            return seed_command(SEED_OP_GERMINATE, issued_by=ISSUER, target_seed_id=layer, blueprint_id=WIDEN,
                                reason=reason.replace("germinate:", f"widen {layer}:", 1))
        return seed_command(
            SEED_OP_GERMINATE, issued_by=ISSUER, target_seed_id=free[0].seed_id,
            blueprint_id=cfg.default_blueprint, reason=reason,
        )

    def _seed_op(self, op: int, seed_id: str, reason: str) -> AdaptationCommand:
        return seed_command(op, issued_by=ISSUER, target_seed_id=seed_id, reason=f"{_name(op)} {seed_id}: {reason}")

    def state_dict(self) -> dict[str, Any]:
        return {
            "val_losses": list(self._val_losses), "last_germination_epoch": self._last_germination_epoch,
            "phase_start_loss": self._phase_start_loss, "slot_culls": dict(self._slot_culls),
            "doomed": sorted(self._doomed), "widened": self._widened,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` output; a state saved before `phase_start_loss` existed starts the
        phase at its oldest recorded loss."""
        self._val_losses = [float(v) for v in state.get("val_losses", [])]
        last = state.get("last_germination_epoch")
        self._last_germination_epoch = None if last is None else int(last)
        start = state.get("phase_start_loss", self._val_losses[0] if self._val_losses else None)
        self._phase_start_loss = None if start is None else float(start)
        self._slot_culls = {int(k): int(v) for k, v in state.get("slot_culls", {}).items()}
        self._doomed = set(state.get("doomed", []))
        self._widened = int(state.get("widened", 0))
