"""Core-loop figures: step overhead against a plain PyTorch loop, boundary latency, packet size/speed.

Every ratio is measured in this process against a baseline run right beside it, alternating
the two so that machine noise hits both alike.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from esper.leyline import SEED_STAGE_BLENDING, SeedState, serialize, system_state_packet
from esper.tolaria.bench.registry import figure


def _batches(features: int, n: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, features, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(n)]


def _mlp(features: int, hidden: list[int]) -> nn.Module:
    from esper.tolaria.models import HostMLP

    torch.manual_seed(0)
    return HostMLP(features, hidden, 10)


def _plain_epoch(model: nn.Module, opt: torch.optim.Optimizer, batches: list[Any]) -> float:
    started = time.perf_counter()
    total = torch.zeros(())
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        total += loss.detach()
    float(total)
    return time.perf_counter() - started


def _tolaria(features: int, hidden: list[int], batches: list[Any]) -> Any:
    from esper.kasmina import KasminaLayer
    from esper.tamiyo import HeuristicTamiyo
    from esper.tolaria.config import config_from_dict
    from esper.tolaria.trainer import TolariaTrainer

    model = _mlp(features, hidden)
    kasmina = KasminaLayer(model, ["stem", "body.1"], example_input=batches[0][0][:2])
    config = config_from_dict({"lr": {"host_policy": "constant"}, "telemetry": {"jsonl": False},
                               "checkpoint": {"enabled": False}, "emergency": {"broadcast": False}})
    return TolariaTrainer(kasmina=kasmina, tamiyo=HeuristicTamiyo(), optimizer=lambda g: torch.optim.Adam(g, lr=1e-3),
                          train_loader=batches, val_loader=batches[:1], loss_fn=nn.functional.cross_entropy,
                          config=config, bus=_NullBus())


class _NullBus:
    def publish(self, stream: str, envelope: Any) -> str:
        return ""

    def close(self) -> None:
        pass


def _tolaria_epoch(trainer: Any) -> float:
    started = time.perf_counter()
    trainer._train_epoch(0)
    return time.perf_counter() - started


def step_overhead(features: int, hidden: list[int], steps: int, rounds: int) -> list[float]:
    """Tolaria's step (no seeds) vs a plain loop; alternating (ABBA) rounds, ratio of medians minus 1.

    (Two identical plain loops measured this way agree within about 1 % on the 2-core CI machine;
    the ratio of the fastest rounds swung by up to 20 %.)"""
    batches = _batches(features, steps, 64)
    plain_model = _mlp(features, hidden)
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=1e-3)
    trainer = _tolaria(features, hidden, batches)
    for _ in range(2):  # warm-up both: allocator pools, caches, lazily built state
        _plain_epoch(plain_model, plain_opt, batches)
        _tolaria_epoch(trainer)
    plain, ours = [], []
    for r in range(rounds):
        # ABBA order: whichever loop runs second in a round was measured ~7 % slower here
        # (cache and allocator state left by the other), so alternate who goes first.
        if r % 2 == 0:
            plain.append(_plain_epoch(plain_model, plain_opt, batches))
            ours.append(_tolaria_epoch(trainer))
        else:
            ours.append(_tolaria_epoch(trainer))
            plain.append(_plain_epoch(plain_model, plain_opt, batches))
    trainer.close()
    return [statistics.median(ours) / statistics.median(plain) - 1.0]


@figure("step_overhead_1m", unit="fraction", goal=0.03)
def step_overhead_1m(quick: bool) -> list[float]:
    return step_overhead(256, [1024, 768], steps=20 if quick else 50, rounds=31 if quick else 61)


@figure("step_overhead_20m", unit="fraction", goal=0.01)
def step_overhead_20m(quick: bool) -> list[float]:
    return step_overhead(1024, [4096, 4096], steps=8 if quick else 25, rounds=7 if quick else 11)


@figure("boundary_p99_ms", unit="ms", goal=2.0)
def boundary_p99_ms(quick: bool) -> list[float]:
    """Tolaria's own boundary work (state assembly, Tamiyo, apply, check) on a small grown model, p99."""
    batches = _batches(64, 4, 32)
    trainer = _tolaria(64, [32], batches)
    for epoch in range(40 if quick else 200):
        trainer.state.epoch = epoch
        trainer.boundary.run(epoch, 1.0)
    trainer.close()
    return [trainer.timer.summary()["total"]["p99"]]


def _packet_with_seeds(n: int) -> Any:
    seeds = [SeedState(seed_id=f"seed{i}", stage=SEED_STAGE_BLENDING, gradient_norm=0.1 * i, learning_rate=1e-3,
                       layer_depth=i, age_epochs=i, risk_score=0.01,
                       metrics={"alpha": 0.5, "val_loss_delta": -0.01}) for i in range(n)]
    return system_state_packet(epoch=12, global_step=4800, training_loss=0.31, validation_loss=0.35,
                               validation_accuracy=0.91, seed_states=seeds, run_id="bench-run",
                               training_metrics={"lr_host": 1e-3, "param_count": 1.0e6})


@figure("packet_serialize_us", unit="us", goal=20.0)
def packet_serialize_us(quick: bool) -> list[float]:
    """Deterministic serialization of a SystemStatePacket carrying 10 seeds."""
    packet = _packet_with_seeds(10)
    n = 2000 if quick else 20000
    for _ in range(200):
        serialize(packet)
    started = time.perf_counter_ns()
    for _ in range(n):
        serialize(packet)
    return [(time.perf_counter_ns() - started) / n / 1e3]


@figure("packet_bytes_no_seeds", unit="bytes", goal=280.0)
def packet_bytes_no_seeds(quick: bool) -> list[float]:
    """Size of the per-epoch packet with no seeds, against the 280-byte hot-path aim."""
    return [float(len(serialize(_packet_with_seeds(0))))]
