"""Step-overhead figures beyond the plain fp32 MLP: a grown model, the text LM, bf16, accumulation.

Each figure is Tolaria's `trainer._run_batch` step against the loop a user would write for the
same work, on the same model and the same optimizer object, interleaved step by step (which goes
first alternates), and reported per round as the median over steps of (Tolaria / plain) - 1, as
`figures_core.step_overhead` does. What "the same work" is differs per figure and is said in each
figure's docstring: the figures measure what Tolaria's orchestration adds (the task dispatch,
the aggregator, the monitors, the LR controller, hooks and counters), not the science a
configuration asks for.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from esper.tolaria.bench.registry import figure

Step = Callable[[Any], None]

# examples/text_lm.toml's [model.kwargs] and [data] batch size; tests/bench checks they still agree.
TEXT_LM_SIZES: dict[str, Any] = {"width": 64, "layers": 2, "heads": 4, "context": 64, "dropout": 0.1}
TEXT_LM_BATCH = 32
TEXT_LM_SLOTS = ["blocks.0", "blocks.1"]
VOCAB = 256

# The plain MLP of `step_overhead_1m`: ~1.05M parameters, batch 64.
MLP_FEATURES, MLP_HIDDEN, MLP_BATCH = 256, [1024, 768], 64
MLP_SLOTS = ["stem", "body.1"]


# ------------------------------------------------------------------------------ the shared measurement


def interleaved_overhead(ours: Step, plain: Step, warm_up: Sequence[Any],
                         rounds: Sequence[Sequence[Any]]) -> list[float]:
    """Per round, the median over its steps of (ours / plain) - 1; both run every step's input,
    alternating which goes first, after both ran each warm-up input once."""
    for item in warm_up:
        plain(item)
        ours(item)
    out = []
    for items in rounds:
        ratios = []
        for i, item in enumerate(items):
            if i % 2 == 0:
                p = _seconds(plain, item)
                o = _seconds(ours, item)
            else:
                o = _seconds(ours, item)
                p = _seconds(plain, item)
            ratios.append(o / p)
        out.append(statistics.median(ratios) - 1.0)
    return out


def _seconds(fn: Step, item: Any) -> float:
    start = time.perf_counter()
    fn(item)
    return time.perf_counter() - start


def _trainer(kasmina: Any, batches: list[Any], *, task: Any = None, lr: float = 1e-4,
             make_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam, **config: Any) -> Any:
    """A Tolaria trainer on `kasmina.model` as `figures_core.bench_trainer` builds one (no telemetry
    file, no checkpoints, no broadcast, constant LR, a null bus) on the CPU; `config` sections override."""
    from esper.tamiyo import HeuristicTamiyo
    from esper.tolaria.bench.figures_core import _NullBus
    from esper.tolaria.config import config_from_dict
    from esper.tolaria.loop.trainer import TolariaTrainer

    run = {"device": "cpu", **config.pop("run", {})}
    cfg = config_from_dict({"lr": {"host_policy": "constant"}, "telemetry": {"jsonl": False},
                            "checkpoint": {"enabled": False}, "emergency": {"broadcast": False}, "run": run,
                            **config})
    return TolariaTrainer(kasmina=kasmina, tamiyo=HeuristicTamiyo(), optimizer=lambda g: make_optimizer(g, lr=lr),
                          train_loader=batches, val_loader=batches[:1], task=task, config=cfg, bus=_NullBus())


def _finish(trainer: Any, opt: torch.optim.Optimizer, name: str, total: torch.Tensor) -> None:
    """Refuse a measurement with incidents or a rebuilt optimizer; close the trainer."""
    from esper.tolaria.bench.figures_core import require_no_incidents

    if not torch.isfinite(total):
        raise RuntimeError(f"{name}: the plain loop's loss went non-finite; the steps are not comparable")
    require_no_incidents(trainer, name)
    if trainer.optim.optimizer is not opt:
        raise RuntimeError(f"{name}: Tolaria rebuilt the optimizer during the measurement; "
                           "the plain loop no longer trains the same state")
    trainer.close()


def _mlp() -> nn.Module:
    from esper.tolaria.models import HostMLP

    torch.manual_seed(0)
    return HostMLP(MLP_FEATURES, MLP_HIDDEN, 10)


def _mlp_batches(n: int, seed: int, batch: int = MLP_BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from esper.tolaria.bench.figures_core import _batches

    return _batches(MLP_FEATURES, n, batch, seed=seed)


def _layer(model: nn.Module, slots: list[str], example: torch.Tensor, config: Any = None) -> Any:
    from esper.kasmina import KasminaLayer

    return KasminaLayer(model, slots, config=config, example_input=example)


def _ours(trainer: Any) -> Step:
    """One Tolaria step over `item` = (micro-batches, indices); the step index keeps counting."""
    def step(item: Any) -> None:
        micro, indices = item
        trainer._run_batch(micro, indices)
    return step


def _numbered(batches: Sequence[Any], per_step: int = 1) -> list[tuple[list[Any], list[int]]]:
    """Batches grouped `per_step` to a step, with the batch indices `_run_batch` takes."""
    return [(list(batches[i:i + per_step]), list(range(i, i + per_step)))
            for i in range(0, len(batches) - per_step + 1, per_step)]


# ------------------------------------------------------------------------------ a grown model


def grow_two_seeds(kasmina: Any) -> tuple[str, str]:
    """Drive one seed to FOSSILIZED (slot `stem`) and one to PROBATIONARY (slot `body.1`) by legal
    Kasmina commands; returns (probationary id, fossilized id). Needs a small-gate KasminaConfig."""
    from esper.leyline import (
        SEED_OP_FINE_TUNE,
        SEED_OP_FOSSILIZE,
        SEED_OP_GERMINATE,
        SEED_OP_STABILIZE,
        SEED_OP_START_GRAFTING,
        SEED_OP_START_TRAINING,
        SEED_STAGE_FOSSILIZED,
        SEED_STAGE_PROBATIONARY,
        seed_command,
    )

    def apply(op: int, target: str) -> str:
        result = kasmina.apply_command(seed_command(op, issued_by="bench", target_seed_id=target))
        if not result.ok:
            raise RuntimeError(f"bench growth: {result.reason}")
        return str(result.seed_id)

    cfg = kasmina.config
    kasmina.on_epoch_end(0, 1.0, 0.5)  # a validation loss exists before grafting
    ids = []
    for slot in ("stem", "body.1"):
        seed_id = apply(SEED_OP_GERMINATE, slot)
        apply(SEED_OP_START_TRAINING, seed_id)
        for _ in range(cfg.min_training_steps):
            kasmina.on_step()
        apply(SEED_OP_START_GRAFTING, seed_id)
        for _ in range(cfg.blend_steps):
            kasmina.on_step()
        apply(SEED_OP_STABILIZE, seed_id)
        kasmina.on_epoch_end(1, 0.9, 0.5)
        apply(SEED_OP_FINE_TUNE, seed_id)
        ids.append(seed_id)
    fossil, probationary = ids
    apply(SEED_OP_FOSSILIZE, fossil)
    if (kasmina.seed_record(probationary).stage, kasmina.seed_record(fossil).stage) != (
            SEED_STAGE_PROBATIONARY, SEED_STAGE_FOSSILIZED):
        raise RuntimeError("bench growth: the seeds did not reach PROBATIONARY and FOSSILIZED")
    return probationary, fossil


@figure("step_overhead_grown", unit="fraction", goal=0.02)
def step_overhead_grown(quick: bool) -> list[float]:
    """Tolaria's step on a grown model vs a plain loop training the same grown model.

    Model: the 1M MLP of `step_overhead_1m` (256 -> 1024 -> 768 -> 10, batch 64, Adam) with a
    FOSSILIZED seed at `stem` (frozen, in the forward through its hook) and a PROBATIONARY seed at
    `body.1` (trained; its own-loss term weighs 1.0), grown by Kasmina commands before the trainer
    is built, so the optimizer holds the host and the probationary seed's group from the start.

    Baseline: what a user training that grown model with Kasmina writes: the forward (the seeds
    are in it, through Kasmina's hooks), cross-entropy, the probationary seed's own loss through
    `kasmina.own_loss_terms` (one extra forward per live seed: the cost of morphogenesis itself,
    not of Tolaria, so both sides pay it), `loss + 1.0 * own_loss` backward, the optimizer step,
    `zero_grad`, and `kasmina.on_step()`. The figure is then Tolaria's orchestration of a grown
    step: the task dispatch, the aggregator's weighted path (stage weights, per-seed stats, its
    one sync), the monitors, the LR controller's per-group writes (a seed warm-up group besides
    the host's), the gradient check cadence. Goal <= 2 %."""
    return measure_grown(*((60, 7) if quick else (120, 11)))


def measure_grown(steps: int, rounds: int) -> list[float]:
    """`step_overhead_grown` over `steps` steps per round."""
    from esper.kasmina import KasminaConfig

    model = _mlp()
    config = KasminaConfig(min_training_steps=1, blend_steps=2, evaluation_steps=1)
    kasmina = _layer(model, MLP_SLOTS, torch.zeros(2, MLP_FEATURES), config)
    probationary, _ = grow_two_seeds(kasmina)
    warm_up = _mlp_batches(2, seed=0)
    trainer = _trainer(kasmina, warm_up)
    trainer.model.train()
    opt = trainer.optim.optimizer
    if probationary not in trainer.optim.group_names():
        raise RuntimeError("step_overhead_grown: the probationary seed is not in the optimizer")
    total = torch.zeros(())

    def plain(item: Any) -> None:
        (x, y), = item[0]
        loss = F.cross_entropy(model(x), y)
        terms = kasmina.own_loss_terms(lambda: F.cross_entropy(model(x), y), x.shape[0])
        for term in terms:
            loss = loss + term.loss  # PROBATIONARY: weight 1.0, same batch
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        kasmina.on_step()
        total.add_(loss.detach())

    values = interleaved_overhead(_ours(trainer), plain, _numbered(warm_up),
                                  [_numbered(_mlp_batches(steps, seed=r + 1)) for r in range(rounds)])
    _finish(trainer, opt, "step_overhead_grown", total)
    return values


# ------------------------------------------------------------------------------ the text LM


def _tokens(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ctx = int(TEXT_LM_SIZES["context"])
    return [torch.randint(0, VOCAB, (TEXT_LM_BATCH, ctx + 1), generator=gen) for _ in range(n)]


@figure("step_overhead_lm", unit="fraction", goal=0.03)
def step_overhead_lm(quick: bool) -> list[float]:
    """Tolaria's step on the text-LM example's model vs a plain loop, no seeds.

    Model: `zoo.CharTransformer` with examples/text_lm.toml's sizes (width 64, 2 layers, 4 heads,
    context 64, dropout 0.1; ~0.13M parameters), AdamW, batches of 32 random token windows
    `[32, 65]` that the `language_model` task shifts (reads `[:, :-1]`, predicts `[:, 1:]`).
    Baseline: `logits = model(batch[:, :-1])`, cross-entropy of `[B*T, V]` logits on the shifted
    targets, backward, step, `zero_grad`. Goal <= 3 %."""
    return measure_lm(*((40, 5) if quick else (120, 11)))


def measure_lm(steps: int, rounds: int) -> list[float]:
    """`step_overhead_lm` over `steps` steps per round."""
    from esper.tolaria.tasks import LanguageModelTask
    from esper.tolaria.zoo import CharTransformer

    torch.manual_seed(0)
    model = CharTransformer(vocab=VOCAB, **TEXT_LM_SIZES)
    kasmina = _layer(model, TEXT_LM_SLOTS, torch.zeros(2, int(TEXT_LM_SIZES["context"]), dtype=torch.long))
    warm_up = _tokens(2, seed=0)
    trainer = _trainer(kasmina, warm_up, task=LanguageModelTask(), lr=1e-3, make_optimizer=torch.optim.AdamW)
    trainer.model.train()
    opt = trainer.optim.optimizer
    total = torch.zeros(())

    def plain(item: Any) -> None:
        tokens, = item[0]
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        total.add_(loss.detach())

    values = interleaved_overhead(_ours(trainer), plain, _numbered(warm_up),
                                  [_numbered(_tokens(steps, seed=r + 1)) for r in range(rounds)])
    _finish(trainer, opt, "step_overhead_lm", total)
    return values


# ------------------------------------------------------------------------------ bf16 autocast


@figure("step_overhead_bf16", unit="fraction", goal=0.03)
def step_overhead_bf16(quick: bool) -> list[float]:
    """Tolaria's step under `run.precision = "bf16"` vs a plain loop with the same CPU autocast.

    Model: the 1M MLP of `step_overhead_1m` (batch 64, Adam, fp32 master weights), no seeds.
    Baseline: `with torch.autocast("cpu", dtype=torch.bfloat16):` forward and cross-entropy (as
    Tolaria computes the loss inside the autocast too), backward outside it, step, `zero_grad`.
    No loss scaling on either side (bf16 needs none). Goal <= 3 %."""
    return measure_bf16(*((80, 7) if quick else (120, 11)))


def measure_bf16(steps: int, rounds: int) -> list[float]:
    """`step_overhead_bf16` over `steps` steps per round."""
    model = _mlp()
    kasmina = _layer(model, MLP_SLOTS, torch.zeros(2, MLP_FEATURES))
    warm_up = _mlp_batches(2, seed=0)
    trainer = _trainer(kasmina, warm_up, run={"precision": "bf16"})
    trainer.model.train()
    opt = trainer.optim.optimizer
    total = torch.zeros(())

    def plain(item: Any) -> None:
        (x, y), = item[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        total.add_(loss.detach())

    values = interleaved_overhead(_ours(trainer), plain, _numbered(warm_up),
                                  [_numbered(_mlp_batches(steps, seed=r + 1)) for r in range(rounds)])
    _finish(trainer, opt, "step_overhead_bf16", total)
    return values


# ------------------------------------------------------------------------------ gradient accumulation

ACCUMULATE = 4


@figure("accumulate_overhead", unit="fraction", goal=0.02)
def accumulate_overhead(quick: bool) -> list[float]:
    """Tolaria's step with `optimizer.accumulate_steps = 4` vs a plain accumulation loop.

    Model: the 1M MLP of `step_overhead_1m` (Adam), no seeds; a step is 4 micro-batches of 64.
    Baseline: for each micro-batch forward, `(cross_entropy / 4).backward()`; then one optimizer
    step and `zero_grad` (Tolaria weighs each micro-batch by its share of the step's samples:
    1/4 here, the same gradient). Goal <= 2 %."""
    return measure_accumulate(*((30, 7) if quick else (60, 11)))


def measure_accumulate(steps: int, rounds: int) -> list[float]:
    """`accumulate_overhead` over `steps` optimizer steps of 4 micro-batches, per round."""
    model = _mlp()
    kasmina = _layer(model, MLP_SLOTS, torch.zeros(2, MLP_FEATURES))
    warm_up = _mlp_batches(2 * ACCUMULATE, seed=0)
    trainer = _trainer(kasmina, warm_up, optimizer={"accumulate_steps": ACCUMULATE})
    trainer.model.train()
    opt = trainer.optim.optimizer
    total = torch.zeros(())

    def plain(item: Any) -> None:
        for x, y in item[0]:
            loss = F.cross_entropy(model(x), y) / ACCUMULATE
            loss.backward()
            total.add_(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)

    values = interleaved_overhead(
        _ours(trainer), plain, _numbered(warm_up, ACCUMULATE),
        [_numbered(_mlp_batches(steps * ACCUMULATE, seed=r + 1), ACCUMULATE) for r in range(rounds)])
    _finish(trainer, opt, "accumulate_overhead", total)
    return values
