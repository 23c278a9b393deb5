"""The GPU figures (`tolaria bench --device cuda`): step overhead at ~10M and ~100M parameters, fast
rollback, checkpoint stall, snapshot bytes on the GPU.

Every measurement is a function of its device and sizes: the registered figures run them on CUDA
at the issue's sizes, and tests/bench runs the same code on the CPU at toy sizes. A timed region
starts after a device synchronisation and is timed by CUDA events around it, then synchronised
again (`DeviceClock`), so a region's time is the device's work plus any host time the device
waited for, never a queue the host ran ahead of. Ratios are measured in one process, interleaved
with their baseline on the same model, after a warm-up.

Models: `zoo.CharTransformer` (a pre-norm causal transformer, vocabulary 256, context 256), bf16
autocast on both sides, AdamW (fp32 master weights and state), batches of random token windows
already on the device. ~100M: width 1024, 8 layers, 16 heads, batch 16 (101.6M parameters);
~10M: width 384, 6 layers, 6 heads, batch 32 (10.9M). Each figure returns as many trials as the
harness asks for (3 quick, 7 full) in one call. Whole bench: about 2 minutes on one H200 (an
estimate from the sizes; see the closing note of the issue for what was measured).
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from esper.tolaria.bench.registry import figure

VOCAB = 256


@dataclass(frozen=True)
class LMSize:
    width: int
    layers: int
    heads: int
    context: int
    batch: int


LM_100M = LMSize(width=1024, layers=8, heads=16, context=256, batch=16)
LM_10M = LMSize(width=384, layers=6, heads=6, context=256, batch=32)


class DeviceClock:
    """Seconds of a call: CUDA events between two synchronisations on a CUDA device, the wall
    clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            start_ns = time.perf_counter_ns()
            fn()
            return (time.perf_counter_ns() - start_ns) / 1e9
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return float(start.elapsed_time(end)) / 1e3


# ------------------------------------------------------------------------------ the job both loops train


class LMJob:
    """A CharTransformer of `size` on `device` with a Tolaria trainer around it (no seeds, constant
    LR, no telemetry file, no broadcast, a null bus); `config` sections override."""

    def __init__(self, device: str, size: LMSize, *, precision: str, run_dir: Path | None = None,
                 **config: Any) -> None:
        from esper.kasmina import KasminaLayer
        from esper.tamiyo import HeuristicTamiyo
        from esper.tolaria.bench.figures_core import _NullBus
        from esper.tolaria.config import config_from_dict
        from esper.tolaria.loop.trainer import TolariaTrainer
        from esper.tolaria.tasks import LanguageModelTask
        from esper.tolaria.zoo import CharTransformer

        self.device, self.size, self.precision = torch.device(device), size, precision
        self.clock = DeviceClock(self.device)
        torch.manual_seed(0)
        with self.device:  # built where it trains: a 100M host is not initialised on the CPU first
            self.model = CharTransformer(vocab=VOCAB, width=size.width, layers=size.layers, heads=size.heads,
                                         context=size.context, dropout=0.0)
        kasmina = KasminaLayer(self.model, [f"blocks.{i}" for i in range(size.layers)])
        run = {"device": device, "precision": precision, **config.pop("run", {})}
        cfg = config_from_dict({"lr": {"host_policy": "constant"}, "telemetry": {"jsonl": False},
                                "checkpoint": {"enabled": False}, "emergency": {"broadcast": False}, "run": run,
                                **config})
        self.batches = [self.tokens(0)]
        self.trainer = TolariaTrainer(kasmina=kasmina, tamiyo=HeuristicTamiyo(),
                                      optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-4),
                                      train_loader=self.batches, val_loader=self.batches, task=LanguageModelTask(),
                                      config=cfg, bus=_NullBus(), run_dir=run_dir)
        self.trainer.model.train()
        self.optimizer = self.trainer.optim.optimizer
        self.steps = 0
        self.plain_loss = torch.zeros((), device=self.device)

    def tokens(self, seed: int) -> torch.Tensor:
        """Random windows `[batch, context + 1]`; the language-model task reads `[:, :-1]`, predicts `[:, 1:]`."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, VOCAB, (self.size.batch, self.size.context + 1), generator=gen).to(self.device)

    def ours(self, tokens: torch.Tensor) -> None:
        self.trainer._run_batch([tokens], [self.steps])
        self.steps += 1

    def plain(self, tokens: torch.Tensor) -> None:
        """The loop a user writes for this model: autocast forward and loss, backward, step, zero_grad."""
        autocast = self.precision != "fp32"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = self.model(tokens[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.plain_loss.add_(loss.detach())

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def finish(self, name: str) -> None:
        """Refuse a measurement with incidents or a rebuilt optimizer; close the trainer."""
        from esper.tolaria.bench.figures_core import require_no_incidents

        if not torch.isfinite(self.plain_loss):
            raise RuntimeError(f"{name}: the plain loop's loss went non-finite; the steps are not comparable")
        require_no_incidents(self.trainer, name)
        if self.trainer.optim.optimizer is not self.optimizer:
            raise RuntimeError(f"{name}: Tolaria rebuilt the optimizer during the measurement")
        self.trainer.close()


# ------------------------------------------------------------------------------ step overhead


def measure_step_overhead(device: str, size: LMSize, *, steps: int, rounds: int, warm_up: int = 3,
                          precision: str = "bf16") -> list[float]:
    """Per round, the median over its steps of (Tolaria's step / the plain loop's step) - 1: both
    train the same model with the same optimizer, step by step, alternating which goes first."""
    job = LMJob(device, size, precision=precision)
    for i in range(warm_up):  # kernels chosen, allocator pools filled, lazily built state built
        job.plain(job.tokens(1000 + i))
        job.ours(job.tokens(1000 + i))
    out = []
    for r in range(rounds):
        ratios = []
        for i in range(steps):
            tokens = job.tokens(r * steps + i + 1)  # fresh windows: nothing is memorised
            if i % 2 == 0:
                plain_s = job.clock.seconds(functools.partial(job.plain, tokens))
                ours_s = job.clock.seconds(functools.partial(job.ours, tokens))
            else:
                ours_s = job.clock.seconds(functools.partial(job.ours, tokens))
                plain_s = job.clock.seconds(functools.partial(job.plain, tokens))
            ratios.append(ours_s / plain_s)
        out.append(statistics.median(ratios) - 1.0)
    job.finish("step_overhead_cuda")
    return out


@figure("step_overhead_cuda_100m", unit="fraction", goal=0.01, device="cuda")
def step_overhead_cuda_100m(quick: bool) -> list[float]:
    """Tolaria's step vs a plain PyTorch loop on the same GPU, no seeds, ~100M-parameter causal
    transformer (see the module docstring). Goal <= 1 %."""
    return measure_step_overhead("cuda", LM_100M, steps=20, rounds=5 if quick else 7)


@figure("step_overhead_cuda_10m", unit="fraction", goal=0.03, device="cuda")
def step_overhead_cuda_10m(quick: bool) -> list[float]:
    """As `step_overhead_cuda_100m` for the ~10M-parameter transformer. Goal <= 3 %."""
    return measure_step_overhead("cuda", LM_10M, steps=40, rounds=5 if quick else 7)


# ------------------------------------------------------------------------------ fast rollback


@dataclass(frozen=True)
class RollbackTimes:
    """Per trial: the p99 of the fast rollbacks in ms, and median(rollback) / median(raw copy)."""

    p99_ms: list[float]
    ratio: list[float]


def measure_fast_rollback(device: str, size: LMSize, *, reps: int, trials: int,
                          precision: str = "bf16") -> RollbackTimes:
    """The trainer's whole fast rollback (prepare/commit/confirm across Kasmina, Tolaria and Tamiyo:
    parameters and AdamW state back from the snapshot cache in host memory) against a raw copy of
    the same tensors' bytes from pinned host buffers to the device, interleaved."""
    from esper.tolaria.recovery.snapshot_cache import flatten_tensors

    job = LMJob(device, size, precision=precision)
    for i in range(2):  # AdamW state exists from the first step on
        job.ours(job.tokens(i))
    trainer = job.trainer
    trainer.safety.start(resumed=False)
    trainer.safety.settle()
    target = trainer.safety.snapshots.last_healthy()
    if target is None:
        raise RuntimeError("fast_rollback: the starting snapshot is not a healthy rollback target")
    live = flatten_tensors({"model": trainer.model.state_dict(), "optimizer": trainer.optim.state_dict()["state"]})
    pinned = job.clock.cuda
    pairs = [(t, _host_copy(t, pinned)) for t in live.values()]

    def ours() -> None:
        outcome = trainer.safety.coordinator.rollback(target, "fast")
        if not outcome.succeeded:
            raise RuntimeError(f"fast rollback failed: {outcome.reason}")

    def raw() -> None:
        with torch.no_grad():
            for dst, src in pairs:
                dst.copy_(src, non_blocking=pinned)

    ours()  # warm-up
    raw()
    p99s, ratios = [], []
    for _ in range(trials):
        ours_ms, raw_ms = [], []
        for _ in range(reps):
            ours_ms.append(job.clock.seconds(ours) * 1e3)
            raw_ms.append(job.clock.seconds(raw) * 1e3)
        p99s.append(_percentile(ours_ms, 0.99))
        ratios.append(statistics.median(ours_ms) / statistics.median(raw_ms))
    trainer.close()
    return RollbackTimes(p99s, ratios)


def _host_copy(t: torch.Tensor, pinned: bool) -> torch.Tensor:
    """The tensor's values in host memory (pinned for a device copy): the raw copy's source."""
    host = t.detach().to("cpu", copy=True)
    return host.pin_memory() if pinned else host


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@functools.cache
def _rollback_100m(quick: bool) -> RollbackTimes:
    """One measurement serves both rollback figures (a 100M trainer is built once)."""
    return measure_fast_rollback("cuda", LM_100M, reps=20 if quick else 40, trials=3 if quick else 7)


@figure("fast_rollback_p99_ms", unit="ms", goal=100.0, device="cuda")
def fast_rollback_p99_ms(quick: bool) -> list[float]:
    """p99 of the trainer's fast rollback of ~100M parameters with AdamW state (1.2 GB from host
    memory to the GPU), per trial. Goal <= 100 ms."""
    return _rollback_100m(quick).p99_ms


@figure("fast_rollback_ratio", unit="x", goal=1.2, device="cuda")
def fast_rollback_ratio(quick: bool) -> list[float]:
    """The fast rollback of `fast_rollback_p99_ms` ÷ a raw pinned host-to-device copy of the same
    tensors, medians per trial. Goal <= 1.2x."""
    return _rollback_100m(quick).ratio


# ------------------------------------------------------------------------------ checkpoint stall


def measure_checkpoint_stall(device: str, size: LMSize, *, trials: int, precision: str = "bf16") -> list[float]:
    """Per trial: the training time a checkpoint costs ÷ a synchronous save of the same state.

    The cost is what a boundary's snapshot and async checkpoint (`Safety.boundary`: snapshot into
    the cache's host buffers, hand-off to the writer) plus the next step take, minus a plain step
    of Tolaria's measured beside it: the copy the next step's forward and backward overlap, and any
    wait for it before the optimizer step, count; the writer's serialisation on its own thread
    does not. The baseline is `torch.save` of the trainer's live state to a file, then fsync."""
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-cuda-") as tmp:
        job = LMJob(device, size, precision=precision, run_dir=Path(tmp) / "run",
                    checkpoint={"enabled": True, "keep_last": 2})
        trainer = job.trainer
        for i in range(2):
            job.ours(job.tokens(i))
        trainer.safety.start(resumed=False)
        ratios = []
        for trial in range(-1, trials):  # one warm-up: buffers allocated, the writer's thread started
            baseline_s = job.clock.seconds(functools.partial(_sync_save, trainer, Path(tmp) / "sync.pt"))
            tokens = job.tokens(100 + trial)
            plain_s = statistics.median(job.clock.seconds(functools.partial(job.ours, tokens)) for _ in range(3))
            stall_s = max(0.0, job.clock.seconds(functools.partial(_boundary_then_step, job, tokens)) - plain_s)
            trainer.safety.flush()  # outside the stall: the next trial starts from an idle writer
            if trial >= 0:
                ratios.append(stall_s / baseline_s)
        job.finish("checkpoint_stall_ratio_cuda")
    return ratios


def _boundary_then_step(job: LMJob, tokens: torch.Tensor) -> None:
    """A boundary's snapshot and checkpoint hand-off, then the next step (which waits for the copy)."""
    job.trainer.safety.settle()  # as the loop does before a boundary
    job.trainer.safety.boundary(job.trainer.state.epoch, 1.0, 0.0)
    job.ours(tokens)


def _sync_save(trainer: Any, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(trainer.registry.live_state(), handle)
        handle.flush()
        os.fsync(handle.fileno())


@figure("checkpoint_stall_ratio_cuda", unit="ratio", goal=0.02, device="cuda")
def checkpoint_stall_ratio_cuda(quick: bool) -> list[float]:
    """Training time per async checkpoint of the ~100M transformer + AdamW ÷ a synchronous
    torch.save + fsync of the same state (see `measure_checkpoint_stall`). Goal <= 0.02."""
    return measure_checkpoint_stall("cuda", LM_100M, trials=3 if quick else 7)


# ------------------------------------------------------------------------------ snapshot bytes on the GPU


def measure_snapshot_gpu_bytes(device: str, size: LMSize, *, boundaries: int = 3,
                               precision: str = "bf16") -> list[float]:
    """Bytes of snapshot storage on a CUDA device after each of `boundaries` boundaries' snapshots
    (the cache's `snapshot_gpu_bytes`: cached snapshots, the spare, the one being filled)."""
    job = LMJob(device, size, precision=precision)
    trainer = job.trainer
    job.ours(job.tokens(0))
    trainer.safety.start(resumed=False)
    cache = trainer.safety.snapshots.cache
    if not hasattr(cache, "snapshot_gpu_bytes"):
        raise RuntimeError("snapshot_gpu_bytes: this SnapshotCache does not report the bytes it holds on a GPU")
    out = []
    for b in range(boundaries):
        job.ours(job.tokens(b + 1))
        trainer.safety.settle()
        trainer.safety.boundary(trainer.state.epoch, 1.0, 0.0)
        out.append(float(cache.snapshot_gpu_bytes))  # while the copy-behind may still be filling
        trainer.safety.settle()
    job.finish("snapshot_gpu_bytes")
    return out


@figure("snapshot_gpu_bytes", unit="bytes", goal=0.0, device="cuda")
def snapshot_gpu_bytes(quick: bool) -> list[float]:
    """GPU memory held by the snapshot cache of a ~10M-parameter CUDA run after boundary snapshots.
    Goal 0: snapshots live in host memory."""
    return measure_snapshot_gpu_bytes("cuda", LM_10M, boundaries=3 if quick else 7)
