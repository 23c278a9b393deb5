"""Bench figures for aggregation, the LR controller and the optimizer manager.

Every model here is a self-contained stand-in for a Kasmina-grown host (no esper.kasmina):
an MLP trunk with residual seed blocks registered under `kasmina_seeds.<id>`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from esper.contracts import SeedLossTerm
from esper.leyline import SEED_STAGE_PROBATIONARY
from esper.tolaria.bench.registry import figure
from esper.tolaria.control.aggregation import AggregationConfig, GradientAggregator
from esper.tolaria.control.lr import ConstantPolicy, CosinePolicy, SeedWarmupPolicy, UnifiedLRController
from esper.tolaria.control.optimizer import DynamicOptimizerManager


class _BenchHost(nn.Module):
    """stem → residual seeds (each blended at alpha) → head; seeds' own losses share the head."""

    def __init__(self, width: int, depth: int, n_seeds: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        self.kasmina_seeds = nn.ModuleDict({f"s{i}": self._seed(width) for i in range(n_seeds)})

    @staticmethod
    def _seed(width: int) -> nn.Module:
        return nn.Sequential(nn.Linear(width, width // 4), nn.ReLU(), nn.Linear(width // 4, width))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.stem:
            x = torch.relu(layer(x))
        return x

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[SeedLossTerm]]:
        h = self.trunk(x)
        blended = h
        for block in self.kasmina_seeds.values():
            blended = blended + 0.5 * block(h)
        host = F.mse_loss(self.head(blended), y)
        detached = h.detach()
        terms = [
            SeedLossTerm(
                seed_id=sid, stage=SEED_STAGE_PROBATIONARY, alpha=1.0, in_evaluation=False,
                loss=F.mse_loss(self.head(detached + block(detached)), y), batch_size=x.shape[0],
                param_names=tuple(f"kasmina_seeds.{sid}.{n}" for n, _ in block.named_parameters()),
            )
            for sid, block in self.kasmina_seeds.items()
        ]
        return host, terms


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@figure("pcgrad_4seed_ratio", unit="x", goal=1.5)
def pcgrad_4seed_ratio(quick: bool) -> list[float]:
    """Time of one full step (forward of host + 4 seed losses, aggregator.backward) in `pcgrad`
    mode divided by the same step in `none` mode, same model, same 4 PROBATIONARY seeds, same
    batch, measured alternately in one process. Model: 4-layer 512-wide trunk, shared 2-layer
    head, 4 bottleneck seeds (2.1M params); batch 256. Goal ≤ 1.5."""
    torch.manual_seed(0)
    model = _BenchHost(width=512, depth=4, n_seeds=4)
    params = dict(model.named_parameters())
    x, y = torch.randn(256, 512), torch.randn(256, 512)
    aggs = {m: GradientAggregator(AggregationConfig(mode=m)) for m in ("none", "pcgrad")}

    def step(mode: str) -> None:
        for p in params.values():
            p.grad = None
        host, terms = model.losses(x, y)
        aggs[mode].backward(host, terms, params, x.shape[0])

    for mode in ("none", "pcgrad"):
        step(mode)  # warm-up
    trials, repeats = (3, 3) if quick else (7, 7)
    return [_median_seconds(lambda: step("pcgrad"), repeats) / _median_seconds(lambda: step("none"), repeats)
            for _ in range(trials)]


@figure("lr_step_us", unit="us", goal=50.0)
def lr_step_us(quick: bool) -> list[float]:
    """Mean µs of one `UnifiedLRController.step` (verify + compute + write + history) with four
    groups: host cosine and three seed warm-ups following the host LR. Goal ≤ 50 µs."""
    names = ["host", "s0", "s1", "s2"]
    optimizer = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "name": n} for n in names], lr=0.1)
    ctl = UnifiedLRController(lambda: optimizer)
    ctl.register_group("host", CosinePolicy(base_lr=0.1, warmup_steps=100, total_steps=100_000), start_step=0)
    for i, name in enumerate(names[1:]):
        ctl.register_group(name, SeedWarmupPolicy(warmup_steps=500, host_multiplier=0.5), start_step=10 * i)
    n = 2_000 if quick else 20_000
    out = []
    step = 0
    for _ in range(3 if quick else 7):
        t0 = time.perf_counter()
        for _ in range(n):
            ctl.step(step)
            step += 1
        out.append((time.perf_counter() - t0) / n * 1e6)
    return out


def _adam_manager(model: nn.Module) -> tuple[DynamicOptimizerManager, UnifiedLRController]:
    holder: list[DynamicOptimizerManager] = []
    ctl = UnifiedLRController(lambda: holder[0].optimizer)
    manager = DynamicOptimizerManager(
        model, lambda groups: torch.optim.Adam(groups, lr=1e-3), ctl,
        host_policy=ConstantPolicy(lr_value=1e-3), seed_policy_factory=lambda _: SeedWarmupPolicy(warmup_steps=10),
    )
    holder.append(manager)
    return manager, ctl


@figure("optimizer_rebuild_ms", unit="ms", goal=10.0)
def optimizer_rebuild_ms(quick: bool) -> list[float]:
    """Wall ms of `DynamicOptimizerManager.rebuild` adding one seed to a 1.58M-parameter model
    (4×512² trunk + 2-layer head; Adam with state on every parameter), including LR registration.
    Each trial adds a fresh seed to a model whose optimizer has stepped once. Goal ≤ 10 ms."""
    out = []
    for trial in range(3 if quick else 7):
        torch.manual_seed(trial)
        model = _BenchHost(width=512, depth=4, n_seeds=0)
        manager, ctl = _adam_manager(model)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        ctl.step(0)
        manager.optimizer.step()
        model.kasmina_seeds["new"] = _BenchHost._seed(512)
        added = tuple(f"kasmina_seeds.new.{n}" for n, _ in model.kasmina_seeds["new"].named_parameters())
        t0 = time.perf_counter()
        result = manager.rebuild(added=added, removed=())
        elapsed = (time.perf_counter() - t0) * 1e3
        if not result.ok:
            raise RuntimeError(f"bench rebuild failed: {result.reason}")
        out.append(elapsed)
    return out
