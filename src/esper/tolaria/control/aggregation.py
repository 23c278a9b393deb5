"""Multi-seed loss and gradient aggregation.

The trainer calls `GradientAggregator.backward` once per step, after the forward pass and
before the optimizer step. It turns the host loss and each seed's own loss into gradients on
the parameters, following ARCHITECTURE.md ("Seed lifecycle and gradient weights"):

    L = L_host + Σ_i w_i · (b_i / b_host) · L_i

where `w_i = seed_weight(term_i)` comes from the single `STAGE_WEIGHTS` table. Modes:

- `none`: one backward of L (the fast path). With no weighted seed it is exactly
  `host_loss.backward()`, so gradients are bitwise identical to a plain backward.
- `pcgrad`: one backward for the host and one per weighted seed. On a seed's *shared*
  parameters (those that get gradient from both the host loss and that seed's loss, minus the
  seed's own parameters) a conflicting seed gradient is projected onto the normal plane of the
  host gradient: `g_i ← g_i − (g_i·g_h / (‖g_h‖² + ε)) g_h` when `g_i·g_h < 0`. Dot products and
  norms run over the shared parameters only (the subspace both gradients live in).
- `average`: on shared parameters the gradient is the mean of the host gradient and the seed
  gradients that reach it; elsewhere contributions add.
- `priority`: per shared parameter tensor, a seed gradient whose dot product with the host
  gradient is negative is dropped, so the host wins every conflict.

Decisions never sync with the device: coefficients are computed with `torch.where` and applied
with `torch._foreach_*` ops. Each step syncs exactly once, to read the stats (`.tolist()` of one
stacked tensor). A non-finite loss or gradient sets every parameter's `.grad` to None, so the
optimizer cannot use it; the caller skips the step.

Precision: every norm, dot product and finiteness sum is accumulated and returned in fp32 (or
wider) whatever the gradients' dtype (`fp32_norms`): summed in fp16, a true norm of ~256 squares
past fp16's largest value and reads as `inf`. fp32 and fp64 gradients take the same kernels as
before and are never copied.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from esper.contracts import SeedLossTerm
from esper.leyline import (
    SEED_STAGE_BLENDING,
    SEED_STAGE_GERMINATED,
    SEED_STAGE_PROBATIONARY,
    SEED_STAGE_SHADOWING,
    SEED_STAGE_TRAINING,
)

ALPHA = "alpha"
"""Marker in `STAGE_WEIGHTS`: the weight is the seed's blending alpha, clamped to [0, 1]."""

STAGE_WEIGHTS: Mapping[int, float | str] = {
    SEED_STAGE_GERMINATED: 0.01,
    SEED_STAGE_TRAINING: 0.1,
    SEED_STAGE_BLENDING: ALPHA,
    SEED_STAGE_SHADOWING: 0.5,
    SEED_STAGE_PROBATIONARY: 1.0,
}
"""The one map from Leyline `SeedLifecycleStage` to gradient weight. Stages not listed
(UNKNOWN, DORMANT, FOSSILIZED, CULLED, EMBARGOED, RESETTING, TERMINATED) weigh 0."""


def seed_weight(term: SeedLossTerm) -> float:
    """The gradient weight of one seed term: 0 while the seed is being evaluated, else by stage."""
    if term.in_evaluation:
        return 0.0
    weight = STAGE_WEIGHTS.get(term.stage, 0.0)
    if weight == ALPHA:
        return min(1.0, max(0.0, float(term.alpha)))
    return float(weight)


class AggregationConfig(BaseModel):
    """How seed gradients are combined with the host gradient."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["none", "pcgrad", "average", "priority"] = Field(
        default="none", description="Combination rule: none (one backward, fastest), pcgrad, average, priority."
    )
    max_grad_norm: float | None = Field(
        default=None, description="Clip the total gradient to this L2 norm (None: no clipping)."
    )
    eps: float = Field(
        default=1e-12, description="Added to ‖g_h‖² in the PCGrad projection and to cosine denominators."
    )

    @field_validator("max_grad_norm")
    @classmethod
    def _positive_norm(cls, value: float | None) -> float | None:
        if value is not None and not value > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None to disable clipping, got {value}")
        return value

    @field_validator("eps")
    @classmethod
    def _positive_eps(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"eps must be > 0 (e.g. 1e-12), got {value}")
        return value


@dataclass
class AggregationStats:
    """What one `backward` did. `finite=False` means every `.grad` was set to None: skip the step.

    `grad_norm` is the L2 norm of the whole total gradient before clipping (square root of the
    sum of squares). Per seed: `weight`, `loss` (the unweighted L_i), `grad_norm` (of the
    weighted seed gradient, before projection), `cosine_with_host` (on shared parameters),
    `projected` (the seed gradient was changed by pcgrad/priority). In `none` mode seed gradients
    are never separated, so `grad_norm` and `cosine_with_host` are NaN (not measured).

    `grad_checked=False`: the step was not asked to measure the whole gradient (no clipping, not
    a check step); `grad_norm` is NaN and `finite` speaks for the loss alone.

    `pending`: a deferred step's total loss, still on the device (`backward(..., defer=True)`):
    nothing was read, `total_loss` is NaN and `finite` is True until the caller reads it.
    """

    total_loss: float
    finite: bool
    grad_norm: float
    seeds: dict[str, dict[str, float]] = field(default_factory=dict)
    grad_checked: bool = True
    pending: Tensor | None = None

    @property
    def grad_overflow(self) -> bool:
        """The loss is finite but the gradient is not: what a GradScaler's too-high scale looks like."""
        return not self.finite and math.isfinite(self.total_loss)


@dataclass
class _SeedGrads:
    """One weighted seed's gradients, split into shared and own positions (indices into params)."""

    term: SeedLossTerm
    weight: float
    grads: list[Tensor | None]
    shared: list[int]
    other: list[int]


class GradientAggregator:
    """Turns host + seed losses into `.grad` on the parameters (see module docstring).

    Contract: on entry `.grad` should be None (`optimizer.zero_grad(set_to_none=True)`); a
    gradient already present is accumulated into, like `Tensor.backward`. On exit, if
    `stats.finite`, `.grad` holds the (clipped) total gradient; otherwise all `.grad` are None.
    """

    def __init__(self, config: AggregationConfig | None = None) -> None:
        self.config = config or AggregationConfig()
        self.steps = 0
        self.nonfinite_steps = 0
        self.projections: dict[str, int] = {}

    def backward(
        self,
        host_loss: Tensor,
        terms: Sequence[SeedLossTerm],
        params: Mapping[str, nn.Parameter],
        host_batch_size: int | None = None,
        check_grads: bool = True,
        *,
        transform: Callable[[Tensor], Tensor] | None = None,
        final: bool = True,
        before_read: Callable[[], None] | None = None,
        defer: bool = False,
    ) -> AggregationStats:
        """Backpropagate `L_host + Σ w_i (b_i/b_host) L_i` per the configured mode.

        `params` are the trainable parameters by name. `host_batch_size` is b_host; None means
        every term used the host's batch (ratio 1). `check_grads=False` skips the read pass over
        every gradient (its norm and non-finite check) unless clipping needs the norm anyway.

        Micro-batches and loss scaling: `transform` maps each loss before its backward (a
        micro-batch's share, a GradScaler's scale); the reported losses are untransformed.
        `final=False` is a micro-batch before the step's last: its gradients only accumulate (no
        read, no clipping). `before_read` runs after the final backward, before any gradient is
        read (a GradScaler's `unscale_`), so norms and clipping see true gradients.

        `defer=True` on an unchecked step reads nothing (no sync): the loss comes back in
        `stats.pending` for the caller to read later. A checked step is always read at once.
        """
        weighted = [(t, w * _ratio(t, host_batch_size)) for t in terms if (w := seed_weight(t)) > 0]
        checked = final and (check_grads or self.config.max_grad_norm is not None)
        if not checked and (not weighted or self.config.mode == "none"):
            return self._unchecked_step(host_loss, terms, weighted, params, transform, before_read if final else None,
                                        defer)
        names = [n for n, p in params.items() if p.requires_grad]
        plist = [params[n] for n in names]
        if self.config.mode == "none" or not weighted:
            extras = self._backward_fused(host_loss, weighted, transform)
        else:
            extras = self._backward_split(host_loss, weighted, names, plist, transform)
        if final and before_read is not None:
            before_read()
        return self._finish(host_loss, terms, weighted, plist, extras, checked)

    # -- fast paths ------------------------------------------------------------------------
    def accumulate(self, host_loss: Tensor, terms: Sequence[SeedLossTerm],
                   transform: Callable[[Tensor], Tensor] | None = None) -> bool:
        """A micro-batch before its step's last with no weighted seed term: its backward needs nothing
        of the aggregator (no read, no split, no sync), so run it and return True. Otherwise return
        False and do nothing: the caller goes through `backward(..., final=False)`. The step's last
        `backward` reads what these gradients add up to; the caller checks their losses."""
        if any(seed_weight(t) > 0 for t in terms):
            return False
        (host_loss if transform is None else transform(host_loss)).backward()
        return True

    def discard(self, params: Mapping[str, nn.Parameter]) -> None:
        """The caller found the step non-finite after `backward` (an earlier micro-batch's loss):
        count it and drop every gradient, as `backward` does itself."""
        self.nonfinite_steps += 1
        for p in params.values():
            p.grad = None

    def _unchecked_step(self, host_loss: Tensor, terms: Sequence[SeedLossTerm],
                        weighted: list[tuple[SeedLossTerm, float]], params: Mapping[str, nn.Parameter],
                        transform: Callable[[Tensor], Tensor] | None,
                        before_read: Callable[[], None] | None, defer: bool) -> AggregationStats:
        """One backward of L with no gradient read and no clipping (mode `none`, or no weighted seed).

        The most common step, kept to a few Python operations and one sync for the losses (none when
        deferred): right after a large kernel the interpreter runs cache-cold, and each extra call
        there costs microseconds. Seed gradients are not separated here, so their norms and cosines
        are NaN (not measured)."""
        total = host_loss
        for term, scale in weighted:
            total = total + scale * term.loss
        (total if transform is None else transform(total)).backward()
        if before_read is not None:
            before_read()
        self.steps += 1
        if defer:
            return AggregationStats(total_loss=math.nan, finite=True, grad_norm=math.nan, grad_checked=False,
                                    seeds=self._seed_stats(terms, weighted, _unmeasured(weighted, read=False)),
                                    pending=total.detach().float().reshape(()))
        if weighted:
            losses = [total.detach().float().reshape(())] + [t.loss.detach().float().reshape(()) for t, _ in weighted]
            values = torch.stack(losses).tolist()  # the one sync
        else:
            values = [float(host_loss.detach())]  # the one sync
            if math.isfinite(values[0]):
                return AggregationStats(total_loss=values[0], finite=True, grad_norm=math.nan, seeds={},
                                        grad_checked=False)
        return self._stats(values[0], math.isfinite(values[0]), math.nan, params.values(), terms, weighted,
                           values[1:] + _unmeasured(weighted, read=True), False)

    def _backward_fused(self, host_loss: Tensor, weighted: list[tuple[SeedLossTerm, float]],
                        transform: Callable[[Tensor], Tensor] | None) -> list[Tensor]:
        total = host_loss
        for term, scale in weighted:
            total = total + scale * term.loss
        (total if transform is None else transform(total)).backward()
        if not weighted:
            return []
        nan = torch.full((len(weighted),), math.nan, device=host_loss.device)
        # grad_norm, cosine, projected per seed: not measured on the fused path.
        return [nan, nan, torch.zeros_like(nan)]

    # -- split path: host and each seed separately ----------------------------------------
    def _backward_split(
        self,
        host_loss: Tensor,
        weighted: list[tuple[SeedLossTerm, float]],
        names: list[str],
        plist: list[nn.Parameter],
        transform: Callable[[Tensor], Tensor] | None,
    ) -> list[Tensor]:
        def prepared(loss: Tensor) -> Tensor:
            return loss if transform is None else transform(loss)

        # Graphs may share nodes (a seed's output feeds both losses), so keep them until the last call.
        gh: list[Tensor | None] = list(torch.autograd.grad(prepared(host_loss), plist, retain_graph=True,
                                                           allow_unused=True))
        seeds: list[_SeedGrads] = []
        for k, (term, scale) in enumerate(weighted):
            last = k == len(weighted) - 1
            grads = torch.autograd.grad(prepared(scale * term.loss), plist, retain_graph=not last, allow_unused=True)
            gi: list[Tensor | None] = list(grads)
            seeds.append(_split_positions(term, scale, gi, gh, names))
        dev = host_loss.device
        host_sq = _sq_norms(gh, dev)
        per_seed = [_seed_geometry(s, gh, host_sq, self.config.eps, dev) for s in seeds]
        total = gh
        if self.config.mode == "pcgrad":
            _combine_pcgrad(total, seeds, per_seed)
        elif self.config.mode == "average":
            _combine_average(total, seeds)
        else:
            projected = _combine_priority(total, seeds, dev)
            per_seed = [(g[0], g[1], g[2], p) for g, p in zip(per_seed, projected, strict=True)]
        _add_own(total, seeds)
        _accumulate(plist, total)
        norms = torch.stack([g[0] for g in per_seed])
        cosines = torch.stack([g[1] for g in per_seed])
        flags = torch.stack([g[3].to(norms.dtype) for g in per_seed])
        return [norms, cosines, flags]

    # -- stats, clipping, non-finite handling ---------------------------------------------
    def _finish(
        self,
        host_loss: Tensor,
        terms: Sequence[SeedLossTerm],
        weighted: list[tuple[SeedLossTerm, float]],
        plist: list[nn.Parameter],
        extras: list[Tensor],
        checked: bool,
    ) -> AggregationStats:
        dev = host_loss.device
        self.steps += 1
        grads = [p.grad for p in plist if p.grad is not None] if checked else []
        if self.config.max_grad_norm is not None and grads:
            norm = _clip(plist, grads, self.config.max_grad_norm, dev)
        else:
            norm = _total_norm(grads, dev)  # zero when not checked: `finite` then speaks for the loss
        total_loss = host_loss.detach().float()
        for term, scale in weighted:
            total_loss = total_loss + scale * term.loss.detach().float()
        seed_losses = [t.loss.detach().float().reshape(()) for t, _ in weighted]
        head = torch.stack([total_loss.reshape(()), norm.detach().float().reshape(()).to(dev)] + seed_losses)
        values = torch.cat([head] + [e.float().to(dev) for e in extras]).tolist()  # the one sync
        finite = math.isfinite(values[0]) and math.isfinite(values[1])
        return self._stats(values[0], finite, values[1] if checked else math.nan, plist, terms, weighted,
                           values[2:], checked)

    def _stats(self, loss: float, finite: bool, norm: float, plist: Iterable[nn.Parameter],
               terms: Sequence[SeedLossTerm], weighted: list[tuple[SeedLossTerm, float]], values: list[float],
               checked: bool) -> AggregationStats:
        if not finite:
            self.nonfinite_steps += 1
            for p in plist:
                p.grad = None
        return AggregationStats(total_loss=loss, finite=finite, grad_norm=norm,
                                seeds=self._seed_stats(terms, weighted, values), grad_checked=checked)

    def _seed_stats(
        self, terms: Sequence[SeedLossTerm], weighted: list[tuple[SeedLossTerm, float]], values: list[float]
    ) -> dict[str, dict[str, float]]:
        n = len(weighted)
        out: dict[str, dict[str, float]] = {}
        for k, (term, _) in enumerate(weighted):
            projected = values[3 * n + k] > 0.5
            out[term.seed_id] = {
                "weight": seed_weight(term),
                "loss": values[k],
                "grad_norm": values[n + k],
                "cosine_with_host": values[2 * n + k],
                "projected": projected,
            }
            if projected:
                self.projections[term.seed_id] = self.projections.get(term.seed_id, 0) + 1
        for term in terms:
            if term.seed_id not in out:
                # Zero-weight seeds took no part in the backward; report their loss as not computed.
                out[term.seed_id] = {
                    "weight": 0.0,
                    "loss": math.nan,
                    "grad_norm": 0.0,
                    "cosine_with_host": math.nan,
                    "projected": False,
                }
        return out

    def summary(self) -> dict[str, Any]:
        return {"mode": self.config.mode, "nonfinite_steps": self.nonfinite_steps}

    def state_dict(self) -> dict[str, Any]:
        """Running counters (the config is not state: it comes from the run's config)."""
        return {"steps": self.steps, "nonfinite_steps": self.nonfinite_steps, "projections": dict(self.projections)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.projections = {str(k): int(v) for k, v in state["projections"].items()}


def _unmeasured(weighted: Sequence[object], *, read: bool) -> list[float]:
    """`_seed_stats` values of a fused step that measured no seed geometry (losses too when not read)."""
    n = len(weighted)
    return ([] if read else [math.nan] * n) + [math.nan] * (2 * n) + [0.0] * n  # grad_norm, cosine, projected


def _ratio(term: SeedLossTerm, host_batch_size: int | None) -> float:
    if host_batch_size is None:
        return 1.0
    if host_batch_size <= 0:
        raise ValueError(f"host_batch_size must be > 0, got {host_batch_size}; pass the host batch's length")
    return term.batch_size / host_batch_size


def _split_positions(
    term: SeedLossTerm, scale: float, gi: list[Tensor | None], gh: list[Tensor | None], names: list[str]
) -> _SeedGrads:
    own = set(term.param_names)
    shared: list[int] = []
    other: list[int] = []
    for idx, g in enumerate(gi):
        if g is None:
            continue
        if gh[idx] is not None and names[idx] not in own:
            shared.append(idx)
        else:
            other.append(idx)
    return _SeedGrads(term=term, weight=scale, grads=gi, shared=shared, other=other)


LOW_PRECISION = (torch.float16, torch.bfloat16)


def fp32_norms(tensors: list[Tensor]) -> list[Tensor]:
    """Per-tensor L2 norms, accumulated and returned in fp32 for fp16/bf16 tensors (in their own
    dtype for fp32/fp64, the unchanged kernel). Squares and sums of the result cannot overflow
    where an fp16 norm would (a norm of 300 squares to inf in fp16)."""
    low = [t.dtype in LOW_PRECISION for t in tensors]
    if not any(low):
        return list(torch._foreach_norm(tensors))
    if all(low):
        return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    wide = iter(torch._foreach_norm([t for t, is_low in zip(tensors, low, strict=True) if not is_low]))
    narrow = iter(torch._foreach_norm([t for t, is_low in zip(tensors, low, strict=True) if is_low], 2,
                                      dtype=torch.float32))
    return [next(narrow) if is_low else next(wide) for is_low in low]


def _sq_norms(grads: Sequence[Tensor | None], dev: torch.device) -> list[Tensor | None]:
    """Per-tensor squared L2 norms (None stays None), computed with one foreach kernel."""
    present = [g for g in grads if g is not None]
    norms = iter(fp32_norms(present)) if present else iter(())
    return [None if g is None else next(norms).square() for g in grads]


def _seed_geometry(
    s: _SeedGrads, gh: list[Tensor | None], host_sq: list[Tensor | None], eps: float, dev: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(‖g_i‖, cos(g_i, g_h) on shared, projection coefficient c_i, projected flag), all on device."""
    zero = torch.zeros((), device=dev)
    present = [g for g in s.grads if g is not None]
    seed_sq = torch.stack(fp32_norms(present)).square().sum() if present else zero
    if not s.shared:
        return seed_sq.sqrt(), zero.clone(), zero.clone(), torch.zeros((), dtype=torch.bool, device=dev)
    dots = torch.stack([_dot(s.grads[i], gh[i]) for i in s.shared])
    dot = dots.sum()
    h2 = torch.stack([_present(host_sq[i]) for i in s.shared]).sum()
    shared_sq = torch.stack([_sq_sum(_present(s.grads[i])) for i in s.shared]).sum()
    cosine = dot / (shared_sq.sqrt() * h2.sqrt() + eps)
    conflict = dot < 0
    coef = torch.where(conflict, dot / (h2 + eps), zero)
    return seed_sq.sqrt(), cosine, coef, conflict


def _present(t: Tensor | None) -> Tensor:
    if t is None:
        raise RuntimeError("internal: a shared position lost its gradient; report this as a bug in aggregation.py")
    return t


def _sq_sum(t: Tensor) -> Tensor:
    """Σ t², in fp32 for fp16/bf16 (fp32/fp64: the unchanged kernel)."""
    return _dot(t, t) if t.dtype in LOW_PRECISION else t.square().sum()


def _dot(a: Tensor | None, b: Tensor | None) -> Tensor:
    """a·b, in fp32 for fp16/bf16 (their products alone overflow fp16: 300·300 > 65504)."""
    x, y = _present(a).reshape(-1), _present(b).reshape(-1)
    if x.dtype in LOW_PRECISION or y.dtype in LOW_PRECISION:
        x, y = x.float(), y.float()
    return torch.dot(x, y)


def _groups_by_membership(seeds: list[_SeedGrads]) -> dict[tuple[int, ...], list[int]]:
    """Shared parameter positions grouped by which seeds share them (usually one or two groups)."""
    members: dict[int, list[int]] = {}
    for k, s in enumerate(seeds):
        for idx in s.shared:
            members.setdefault(idx, []).append(k)
    groups: dict[tuple[int, ...], list[int]] = {}
    for idx, ks in members.items():
        groups.setdefault(tuple(ks), []).append(idx)
    return groups


def _combine_pcgrad(
    total: list[Tensor | None], seeds: list[_SeedGrads], geometry: list[tuple[Tensor, Tensor, Tensor, Tensor]]
) -> None:
    """total = g_h·(1 − Σ_i c_i) + Σ_i g_i on shared positions, which equals Σ_i (projected g_i) + g_h."""
    for ks, idxs in _groups_by_membership(seeds).items():
        factor = 1.0 - torch.stack([geometry[k][2] for k in ks]).sum()
        torch._foreach_mul_([_present(total[i]) for i in idxs], factor)
    for s in seeds:
        _add_at(total, s.grads, s.shared)


def _combine_average(total: list[Tensor | None], seeds: list[_SeedGrads]) -> None:
    for s in seeds:
        _add_at(total, s.grads, s.shared)
    for ks, idxs in _groups_by_membership(seeds).items():
        torch._foreach_mul_([_present(total[i]) for i in idxs], 1.0 / (1 + len(ks)))


def _combine_priority(total: list[Tensor | None], seeds: list[_SeedGrads], dev: torch.device) -> list[Tensor]:
    """Drop each seed's gradient on shared tensors where it conflicts with the host's; return flags."""
    flags: list[Tensor] = []
    for s in seeds:
        if not s.shared:
            flags.append(torch.zeros((), dtype=torch.bool, device=dev))
            continue
        dots = torch.stack([_dot(s.grads[i], total[i]) for i in s.shared])
        keep = (dots >= 0).to(_present(s.grads[s.shared[0]]).dtype)
        kept = [_present(s.grads[i]) for i in s.shared]
        torch._foreach_mul_(kept, list(keep.unbind()))
        flags.append((dots < 0).any())
    for s in seeds:
        _add_at(total, s.grads, s.shared)
    return flags


def _add_own(total: list[Tensor | None], seeds: list[_SeedGrads]) -> None:
    """Seed gradients on positions that are not shared (own params, host-free params) just add."""
    for s in seeds:
        _add_at(total, s.grads, s.other)


def _add_at(total: list[Tensor | None], grads: list[Tensor | None], idxs: list[int]) -> None:
    rest: list[int] = []
    for i in idxs:
        if total[i] is None:
            total[i] = grads[i]
        else:
            rest.append(i)
    if rest:
        torch._foreach_add_([_present(total[i]) for i in rest], [_present(grads[i]) for i in rest])


def _accumulate(plist: list[nn.Parameter], total: list[Tensor | None]) -> None:
    for p, g in zip(plist, total, strict=True):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)


def _total_norm(grads: list[Tensor], dev: torch.device) -> Tensor:
    """sqrt(sum of squares) of all gradients: the step's one read pass over them (it is also the
    non-finite check). For contiguous fp32/fp64 gradients a BLAS dot per tensor is the fastest
    pass on CPU (~25 % under `_foreach_norm` at 20M parameters); otherwise `_foreach_norm`."""
    if not grads:
        return torch.zeros((), device=dev)
    dtype = grads[0].dtype
    if dtype in (torch.float32, torch.float64) and all(g.is_contiguous() and g.dtype == dtype for g in grads):
        flat = [g.view(-1) for g in grads]
        return torch.stack([torch.dot(f, f) for f in flat]).sum().sqrt()
    return torch.stack(fp32_norms(grads)).square().sum().sqrt()


def _clip(plist: list[nn.Parameter], grads: list[Tensor], max_norm: float, dev: torch.device) -> Tensor:
    """Clip the total gradient to `max_norm`; returns the norm before clipping. fp32/fp64 gradients
    use torch's own `clip_grad_norm_`, which sums in the gradients' dtype; with any fp16/bf16
    gradient the norm is measured in fp32 and the same scale (max_norm / (norm + 1e-6), at most 1)
    applied."""
    if not any(g.dtype in LOW_PRECISION for g in grads):
        return torch.nn.utils.clip_grad_norm_(plist, max_norm, foreach=True)
    norm = _total_norm(grads, dev)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for dtype in {g.dtype for g in grads}:  # one foreach kernel per dtype, like torch's own
        torch._foreach_mul_([g for g in grads if g.dtype == dtype], scale)
    return norm
