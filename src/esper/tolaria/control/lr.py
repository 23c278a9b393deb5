"""The unified learning-rate controller: the only code that writes `param_group["lr"]`.

Every optimizer param group carries a `"name"` key (`"host"`, or a seed id) and is registered
here with a policy. `UnifiedLRController.step(global_step)` runs once per training step, before
the optimizer step:

1. verify: each group's LR must still be what the controller last wrote (relative tolerance).
   A mismatch is an out-of-band write: the controlled value is restored and an `LRViolation`
   is recorded (`drain_violations()`), for the trainer's breaker and an event.
2. compute: each policy is a pure function of (step, registration step, small state); the host
   group is computed first because seed warm-ups may follow a multiple of the host LR. The
   emergency `scale` factor multiplies every group.
3. write the new values and append (step, name, lr) to a bounded history.

State is small and derived: policies, registration steps, plateau counters and the emergency
scale. LRs are recomputed from the step after a resume, never stored.
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter

from esper.contracts import EventSink
from esper.leyline import TELEMETRY_LEVEL_ERROR
from esper.tolaria.control.breakers import CircuitBreaker

HOST_GROUP = "host"


class BasePolicy(BaseModel):
    """Base of every LR policy: a pure function of (step, registration step, host LR, small state)."""

    # Frozen: a policy's definition never changes after it is built (its counters are private
    # state), so the controller can compare definitions instead of re-parsing them.
    model_config = ConfigDict(extra="forbid", frozen=True)

    def lr(self, step: int, start: int, host_lr: float) -> float:
        """The LR at global `step` for a group registered at `start` (host_lr: the host's LR now)."""
        raise NotImplementedError

    def on_validation(self, val_loss: float) -> None:
        """Plateau-driven policies update their counters; others ignore it."""

    def get_state(self) -> dict[str, float]:
        return {}

    def set_state(self, state: Mapping[str, float]) -> None:
        """Stateless policies have nothing to restore."""


class CosinePolicy(BasePolicy):
    """Linear warm-up to `base_lr` over `warmup_steps`, then cosine down to `min_lr` at `total_steps`."""

    kind: Literal["cosine"] = "cosine"
    base_lr: float = Field(gt=0, description="Peak LR reached after warm-up.")
    min_lr: float = Field(default=0.0, ge=0, description="Floor reached at total_steps and kept after.")
    warmup_steps: int = Field(default=0, ge=0, description="Steps of linear warm-up from base_lr/warmup_steps.")
    total_steps: int = Field(gt=0, description="Steps (from registration) at which the cosine reaches min_lr.")

    def lr(self, step: int, start: int, host_lr: float) -> float:
        s = step - start
        if s < self.warmup_steps:
            return self.base_lr * (s + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (s - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


class SeedWarmupPolicy(BasePolicy):
    """Linear warm-up from 0 over `warmup_steps` from registration, then a fixed target.

    The target is `base_lr` when set, else `host_multiplier` × the host group's current LR.
    At the registration step the LR is target/warmup_steps; it reaches target after warmup_steps.
    """

    kind: Literal["seed_warmup"] = "seed_warmup"
    warmup_steps: int = Field(default=100, ge=1, description="Steps from registration to the full target.")
    base_lr: float | None = Field(default=None, gt=0, description="Fixed target LR; None follows the host.")
    host_multiplier: float = Field(default=1.0, gt=0, description="Target = this × host LR when base_lr is None.")

    def lr(self, step: int, start: int, host_lr: float) -> float:
        target = self.base_lr if self.base_lr is not None else self.host_multiplier * host_lr
        ramp = min(1.0, max(0, step - start + 1) / self.warmup_steps)
        return target * ramp


class MorphoAdaptivePolicy(BasePolicy):
    """Plateau-driven: multiply by `factor` after `patience` validation reports without improvement.

    Improvement means `val_loss < best · (1 − threshold)`. The LR is `base_lr · factor^reductions`,
    never below `min_lr`. State: best, bad-report count, reductions.
    """

    kind: Literal["morpho_adaptive"] = "morpho_adaptive"
    base_lr: float = Field(gt=0, description="LR before any reduction.")
    factor: float = Field(default=0.5, gt=0, lt=1, description="Multiplier applied on each plateau.")
    patience: int = Field(default=3, ge=1, description="Reports without improvement before a reduction.")
    min_lr: float = Field(default=0.0, ge=0, description="Floor for the LR.")
    threshold: float = Field(default=1e-4, ge=0, description="Relative improvement that resets the counter.")
    _best: float = PrivateAttr(default=math.inf)
    _bad: int = PrivateAttr(default=0)
    _reductions: int = PrivateAttr(default=0)

    def lr(self, step: int, start: int, host_lr: float) -> float:
        return max(self.min_lr, self.base_lr * self.factor**self._reductions)

    def on_validation(self, val_loss: float) -> None:
        if val_loss < self._best * (1.0 - self.threshold) or self._best == math.inf:
            self._best = val_loss
            self._bad = 0
            return
        self._bad += 1
        if self._bad >= self.patience:
            self._reductions += 1
            self._bad = 0

    def get_state(self) -> dict[str, float]:
        return {"best": self._best, "bad": self._bad, "reductions": self._reductions}

    def set_state(self, state: Mapping[str, float]) -> None:
        self._best = float(state["best"])
        self._bad = int(state["bad"])
        self._reductions = int(state["reductions"])


class StepPolicy(BasePolicy):
    """`base_lr · gamma^((step − start) // step_size)`."""

    kind: Literal["step"] = "step"
    base_lr: float = Field(gt=0, description="LR for the first step_size steps.")
    gamma: float = Field(default=0.1, gt=0, description="Multiplier applied every step_size steps.")
    step_size: int = Field(gt=0, description="Steps between decays.")

    def lr(self, step: int, start: int, host_lr: float) -> float:
        return self.base_lr * self.gamma ** (max(0, step - start) // self.step_size)


class ConstantPolicy(BasePolicy):
    """A fixed LR."""

    kind: Literal["constant"] = "constant"
    lr_value: float = Field(ge=0, alias="lr", description="The LR.")
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def lr(self, step: int, start: int, host_lr: float) -> float:
        return self.lr_value


class FrozenPolicy(BasePolicy):
    """LR 0: the group's parameters do not move (momentum/moments are kept)."""

    kind: Literal["frozen"] = "frozen"

    def lr(self, step: int, start: int, host_lr: float) -> float:
        return 0.0


LRPolicy = Annotated[
    CosinePolicy | SeedWarmupPolicy | MorphoAdaptivePolicy | StepPolicy | ConstantPolicy | FrozenPolicy,
    Field(discriminator="kind"),
]
_POLICY_ADAPTER: TypeAdapter[Any] = TypeAdapter(LRPolicy)


def parse_policy(data: Mapping[str, Any]) -> BasePolicy:
    """Build a policy from a config mapping with a `kind` key (raises pydantic ValidationError)."""
    policy: BasePolicy = _POLICY_ADAPTER.validate_python(dict(data))
    return policy


@dataclass(frozen=True)
class LRViolation:
    """An out-of-band LR write found by `step`: group `group` held `found`, not `expected`."""

    group: str
    expected: float
    found: float
    step: int


class UnifiedLRController:
    """Sole writer of LRs (see module docstring). `optimizer_provider` returns the current
    optimizer (the optimizer manager's), so a rebuilt optimizer is picked up automatically."""

    def __init__(
        self,
        optimizer_provider: Callable[[], torch.optim.Optimizer],
        *,
        tolerance: float = 1e-6,
        history: int = 1000,
    ) -> None:
        if not tolerance > 0:
            raise ValueError(f"tolerance must be > 0 (relative), got {tolerance}")
        self._provider = optimizer_provider
        self.tolerance = tolerance
        self._policies: dict[str, BasePolicy] = {}
        self._definitions: dict[str, Mapping[str, Any]] = {}  # each policy's dump, for load_state_dict
        self._starts: dict[str, int] = {}
        self._scale = 1.0
        self._scale_reasons: deque[tuple[float, str]] = deque(maxlen=32)
        self._last_step: int | None = None
        self._current: dict[str, float] = {}
        self._written: dict[str, float] = {}
        self._written_for: weakref.ref[torch.optim.Optimizer] | None = None
        self.violations: list[LRViolation] = []  # found by `step`, not yet drained
        self.history: deque[tuple[int, str, float]] = deque(maxlen=history)

    # -- registration ------------------------------------------------------------------------
    def register_group(self, name: str, policy: BasePolicy | Mapping[str, Any], start_step: int | None = None) -> None:
        """Control group `name` with `policy` from `start_step` (default: the next step)."""
        if name in self._policies:
            raise ValueError(f"LR group {name!r} is already registered; unregister_group({name!r}) first")
        if start_step is not None and start_step < 0:
            raise ValueError(f"start_step must be >= 0 or None (the next step), got {start_step}")
        start = self._next_step() if start_step is None else start_step
        parsed = policy if isinstance(policy, BasePolicy) else parse_policy(policy)
        if name == HOST_GROUP and isinstance(parsed, SeedWarmupPolicy) and parsed.base_lr is None:
            raise ValueError("the host group's seed_warmup policy has no base_lr, so it would follow the "
                             "host LR, i.e. itself; give it a base_lr (the LR it warms up to)")
        self._policies[name] = parsed
        self._definitions[name] = self._policies[name].model_dump(by_alias=True)
        self._starts[name] = start

    def unregister_group(self, name: str) -> None:
        """Stop controlling `name` (its seed was removed). Unknown names are an error."""
        if name not in self._policies:
            raise KeyError(f"LR group {name!r} is not registered; registered: {sorted(self._policies)}")
        del self._policies[name], self._starts[name], self._definitions[name]
        self._current.pop(name, None)
        self._written.pop(name, None)

    def groups(self) -> dict[str, BasePolicy]:
        return dict(self._policies)

    # -- the per-step call -------------------------------------------------------------------
    def step(self, global_step: int) -> dict[str, float]:
        """Verify, compute and write the LRs for `global_step`; return them by group name."""
        optimizer = self._provider()
        self._verify(optimizer, global_step)
        self._last_step = global_step
        self._current = self._compute(global_step)
        self._write(optimizer)
        for name, value in self._current.items():
            self.history.append((global_step, name, value))
        return dict(self._current)

    def refresh(self) -> None:
        """Recompute the last step's LRs (after a registration change or `scale`) and write them.

        The optimizer manager calls this right after it swaps in a rebuilt optimizer, whose
        groups start with the factory's default LR: a replaced optimizer is adopted without
        verification; the current one is verified first, as in `step`."""
        if self._last_step is None:
            return
        optimizer = self._provider()
        self._verify(optimizer, self._last_step)
        self._current = self._compute(self._last_step)
        self._write(optimizer)

    def drain_violations(self) -> list[LRViolation]:
        """Violations found since the last drain (the trainer records them on its breaker)."""
        out, self.violations = self.violations, []
        return out

    def current(self) -> dict[str, float]:
        """The LRs written at the last step, by group name."""
        return dict(self._current)

    # -- boundary-time inputs ----------------------------------------------------------------
    def report_validation(self, val_loss: float) -> None:
        """Feed an epoch's validation loss to plateau-driven policies (effective from the next step)."""
        if not math.isfinite(val_loss):
            return  # a non-finite validation is an emergency, not a plateau signal
        for policy in self._policies.values():
            policy.on_validation(val_loss)

    def scale(self, factor: float, reason: str) -> None:
        """Multiply every group's LR by `factor` from now on (emergency MINOR action); kept on resume."""
        if not 0 < factor:
            raise ValueError(f"LR scale factor must be > 0, got {factor}; use a FrozenPolicy to stop a group")
        self._scale *= factor
        self._scale_reasons.append((factor, reason))
        self.refresh()

    @property
    def scale_factor(self) -> float:
        return self._scale

    # -- snapshots -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "groups": {
                name: {"policy": p.model_dump(by_alias=True), "start_step": self._starts[name], "state": p.get_state()}
                for name, p in self._policies.items()
            },
            "scale": self._scale,
            "scale_reasons": list(self._scale_reasons),
            "last_step": self._last_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace all registrations with the saved ones; LRs are recomputed at the next step."""
        policies: dict[str, BasePolicy] = {}
        definitions: dict[str, Mapping[str, Any]] = {}
        starts: dict[str, int] = {}
        for name, entry in state["groups"].items():
            # The same definition keeps its (frozen) policy object: a fast rollback then skips
            # re-validating every policy; only the counters are loaded.
            policy = self._policies.get(name)
            if policy is None or self._definitions.get(name) != entry["policy"]:
                policy = parse_policy(entry["policy"])
            policy.set_state(entry["state"])
            policies[name], definitions[name] = policy, entry["policy"]
            starts[name] = int(entry["start_step"])
        self._policies, self._starts, self._definitions = policies, starts, definitions
        self._scale = float(state["scale"])
        self._scale_reasons = deque(((float(f), str(r)) for f, r in state["scale_reasons"]), maxlen=32)
        self._last_step = None if state["last_step"] is None else int(state["last_step"])
        # The next step adopts the optimizer (no verification against values this instance never wrote).
        self._written, self._written_for, self._current = {}, None, {}

    # -- internals -----------------------------------------------------------------------------
    def _next_step(self) -> int:
        return 0 if self._last_step is None else self._last_step + 1

    def _compute(self, step: int) -> dict[str, float]:
        host_policy = self._policies.get(HOST_GROUP)
        # The host's own policy never reads its third argument: register_group refuses one that would.
        host_lr = host_policy.lr(step, self._starts[HOST_GROUP], 0.0) if host_policy is not None else 0.0
        out: dict[str, float] = {}
        for name, policy in self._policies.items():
            base = host_lr if name == HOST_GROUP else policy.lr(step, self._starts[name], host_lr)
            out[name] = base * self._scale
        return out

    def _verify(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self._written_for is None or self._written_for() is not optimizer:
            return  # a replaced optimizer is adopted: nothing was written to it yet
        for group in optimizer.param_groups:
            name = str(group.get("name"))
            expected = self._written.get(name)
            if expected is None:
                continue
            found = float(group["lr"])
            if not math.isclose(found, expected, rel_tol=self.tolerance, abs_tol=1e-15):
                self.violations.append(LRViolation(group=name, expected=expected, found=found, step=step))

    def _write(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            name = group.get("name")
            if name is None:
                raise ValueError("optimizer param group has no 'name'; build groups with DynamicOptimizerManager")
            if name not in self._current:
                raise KeyError(f"optimizer group {name!r} has no LR policy; call register_group({name!r}, policy)")
            group["lr"] = self._current[name]
            self._written[name] = self._current[name]
        self._written_for = weakref.ref(optimizer)


def record_lr_violations(controller: UnifiedLRController, breaker: CircuitBreaker, events: EventSink) -> None:
    """Each out-of-band LR write the controller caught (and reverted) is a failure on its breaker."""
    for v in controller.drain_violations():
        what = f"group {v.group}: lr {v.found:g} written out of band (expected {v.expected:g})"
        opened = breaker.record_failure(what)
        events("lr_out_of_band_write", TELEMETRY_LEVEL_ERROR, group=v.group, expected=v.expected,
               found=v.found, step=v.step, breaker_opened=opened)
