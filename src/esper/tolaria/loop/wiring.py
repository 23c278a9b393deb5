"""Building one run's components, each from the narrow dependencies it uses.

The trainer calls these once, in order: the control components (LR, optimizer, aggregation,
breakers, conservative mode), the state registry (which components a snapshot holds, in restore
order), then recovery (journal, checkpoints, snapshots, rollback participants, safety).
Optional capabilities of what the user passes in (a stateful controller, a resumable sampler)
are checked here, once, as protocols.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esper.contracts import EventSink, ExecutionLayer, OonaBus, StatefulComponent, TamiyoClient
from esper.leyline import AdaptationCommand
from esper.tolaria.checkpoint import CheckpointStore
from esper.tolaria.checkpoint.journal import CommandJournal
from esper.tolaria.config import ConfigError, TolariaConfig
from esper.tolaria.control.aggregation import AggregationConfig, GradientAggregator
from esper.tolaria.control.breakers import BreakerBoard
from esper.tolaria.control.conservative import ConservativeMode
from esper.tolaria.control.lr import UnifiedLRController
from esper.tolaria.control.optimizer import DynamicOptimizerManager
from esper.tolaria.distributed import World
from esper.tolaria.loop.apply import CommandApplier
from esper.tolaria.loop.boundary import BoundaryReport, EpochBoundary, TamiyoConsult
from esper.tolaria.loop.compile import RecompileOnGrowth, compile_host
from esper.tolaria.loop.evaluate import Validation
from esper.tolaria.loop.flops import TrainingFlops, rows_per_step
from esper.tolaria.loop.handshake import TamiyoHandshake
from esper.tolaria.loop.keep_best import best_scorer
from esper.tolaria.loop.precision import Precision
from esper.tolaria.loop.structure import structure_key
from esper.tolaria.observe.profiling import Profiler
from esper.tolaria.observe.runlog import RunLog
from esper.tolaria.observe.timing import EventFactory, MonotonicTimer
from esper.tolaria.recovery.checkpoints import Checkpoints
from esper.tolaria.recovery.monitors import MonitorSet
from esper.tolaria.recovery.participants import KasminaParticipant, TamiyoParticipant, TolariaParticipant
from esper.tolaria.recovery.responses import Responses
from esper.tolaria.recovery.rollback import RollbackCoordinator
from esper.tolaria.recovery.run_channel import open_run_channel
from esper.tolaria.recovery.safety import Safety
from esper.tolaria.recovery.snapshots import Snapshots
from esper.tolaria.state.position import RunIdentity, StopRequest, TrainerState
from esper.tolaria.state.registry import StateRegistry
from esper.tolaria.tasks import Task, move_batch

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


def optimizer_factory(optimizer: OptimizerFactory | torch.optim.Optimizer) -> OptimizerFactory:
    """A factory of param groups -> optimizer; a constructed `torch.optim` optimizer gives one of the
    same class and defaults (the optimizer is rebuilt whenever the model grows)."""
    if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    cls, defaults = type(optimizer), dict(optimizer.defaults)
    defaults.pop("differentiable", None)
    return lambda groups: cls(groups, **defaults)


@dataclass
class Control:
    lr: UnifiedLRController
    optim: DynamicOptimizerManager
    aggregator: GradientAggregator
    breakers: BreakerBoard
    conservative: ConservativeMode


def build_control(config: TolariaConfig, model: torch.nn.Module, factory: OptimizerFactory,
                  loader: Iterable[Any]) -> Control:
    holder: list[DynamicOptimizerManager] = []  # the LR controller reads the optimizer it rebuilds
    lr = UnifiedLRController(lambda: holder[0].optimizer, tolerance=config.lr.tolerance)
    c = config.lr
    seed_policy = {"kind": "seed_warmup", "warmup_steps": max(1, c.seed_warmup_steps),
                   "host_multiplier": c.seed_lr_ratio}
    holder.append(DynamicOptimizerManager(model, factory, lr, host_policy=host_policy_spec(config, loader),
                                          seed_policy_factory=lambda _seed_id: dict(seed_policy)))
    return Control(lr, holder[0], GradientAggregator(AggregationConfig.model_validate(config.aggregation)),
                   BreakerBoard(failure_threshold=config.breakers.failure_threshold,
                                cooldown_calls=config.breakers.cooldown_calls),
                   ConservativeMode(config.conservative.healthy_epochs_to_exit))


def boundary_timer(config: TolariaConfig, events: EventFactory | None) -> MonotonicTimer:
    """The boundary's phase timer; `events` (CUDA timing events on a CUDA run) times what the device did."""
    b = config.boundary
    return MonotonicTimer({"state_assembly": b.state_assembly_ms, "tamiyo": b.tamiyo_ms, "apply": b.apply_ms,
                           "check": b.check_ms, "total": b.total_ms}, events=events)


def compile_watch(config: TolariaConfig, kasmina: ExecutionLayer) -> RecompileOnGrowth | None:
    """`run.compile`: the host compiled in place, and the callback that drops its graphs when seeds change."""
    compiled = compile_host(kasmina.model, config.run.compile, backend=config.run.compile_backend)
    if compiled is None:
        return None
    return RecompileOnGrowth(compiled, lambda: structure_key(kasmina))


def build_monitors(config: TolariaConfig) -> MonitorSet:
    e = config.emergency
    return MonitorSet(spike_factor=e.spike_factor, accuracy_drop=e.accuracy_drop, budget_ms=config.boundary.total_ms,
                      collapse_fraction=config.growth.collapse_fraction, collapse_below=config.growth.collapse_below)


def build_handshake(config: TolariaConfig, tamiyo: TamiyoClient,
                    verifier: Callable[[AdaptationCommand], None] | None) -> TamiyoHandshake:
    h = config.handshake
    return TamiyoHandshake(tamiyo, timeout_s=h.tamiyo_timeout_s, command_max_age_s=h.command_max_age_s,
                           max_abandoned=h.max_abandoned_workers, verifier=verifier)


def stateful_or_none(component: object) -> StatefulComponent | None:
    """An optional capability, checked once: a controller may keep state of its own, or not."""
    return component if isinstance(component, StatefulComponent) else None


def open_store(config: TolariaConfig, directory: Path | None, world: World, identity: RunIdentity,
               fault: Callable[[str], None] | None) -> CheckpointStore | None:
    """Rank 0 writes checkpoints; every rank reads them for a full rollback or a resume."""
    if directory is None or not world.is_leader:
        return None
    return CheckpointStore(directory, keep_last=config.checkpoint.keep_last,
                           keep_best=config.checkpoint.keep_best.top_k, run_id=identity.run_id,
                           config_sha256=identity.config_sha256, fault=fault, world_size=world.size)


@dataclass
class Recovery:
    journal: CommandJournal
    checkpoints: Checkpoints
    snapshots: Snapshots
    safety: Safety


def build_recovery(config: TolariaConfig, *, run_dir: Path | None, store_fault: Callable[[str], None] | None,
                   identity: RunIdentity, position: TrainerState, world: World, registry: StateRegistry,
                   kasmina: ExecutionLayer, tamiyo: StatefulComponent | None, control: Control,
                   monitors: MonitorSet, log: RunLog, events: EventSink, publish_emergency: Callable[[Any], None],
                   timer: MonotonicTimer, profiler: Profiler, skip_batch: Callable[[tuple[int, int]], None] | None,
                   stop: StopRequest, task: Any) -> Recovery:
    directory = run_dir / "checkpoints" if config.checkpoint.enabled and run_dir is not None else None
    store = open_store(config, directory, world, identity, store_fault)
    journal = CommandJournal(store, events)
    checkpoints = Checkpoints(directory, store, breaker=control.breakers["checkpoint"], journal=journal, world=world,
                              log=log, events=events, scorer=best_scorer(config.checkpoint.keep_best, task, log))
    model, optim = kasmina.model, control.optim
    snapshots = Snapshots(config.snapshots, registry=registry, model=model, optimizer=lambda: optim.optimizer,
                          position=position, profiler=profiler, timer=timer, events=events)
    tolaria = TolariaParticipant(registry=registry, model=model, optim=optim, position=position,
                                 settle=snapshots.settle)
    coordinator = RollbackCoordinator([KasminaParticipant(kasmina), tolaria, TamiyoParticipant(tamiyo)])
    e = config.emergency
    channel = open_run_channel(run_dir, identity.run_id, world.rank) if e.broadcast else None
    responses = Responses(config, position=position, world=world, snapshots=snapshots, checkpoints=checkpoints,
                          coordinator=coordinator, restore_path=lambda: tolaria.last_restore, journal=journal,
                          runlog=log, events=events, frozen=threading.Event(), lower_lr=control.lr.scale,
                          skip_batch=skip_batch, stop=stop)
    safety = Safety(config, position=position, world=world, model=model, monitors=monitors, snapshots=snapshots,
                    checkpoints=checkpoints, responses=responses, runlog=log, events=events, channel=channel,
                    publish_emergency=publish_emergency, run_id=identity.run_id, stop=stop)
    return Recovery(journal, checkpoints, snapshots, safety)


def build_boundary(config: TolariaConfig, *, position: TrainerState, identity: RunIdentity, kasmina: ExecutionLayer,
                   handshake: TamiyoHandshake, control: Control, journal: CommandJournal,
                   validate: Callable[[], Validation], timer: MonotonicTimer, profiler: Profiler, log: RunLog,
                   events: EventSink, world: World, on_check: Callable[[int, BoundaryReport], None],
                   monitors: MonitorSet | None = None) -> EpochBoundary:
    breakers, conservative = control.breakers, control.conservative
    consult = TamiyoConsult(handshake=handshake, breaker=breakers["tamiyo"], conservative=conservative, world=world,
                            config=config, log=log, events=events)
    applier = CommandApplier(kasmina, control.optim, breakers["kasmina"], journal, log, events, position,
                             config.growth)

    def validate_and_note() -> Validation:  # the veto judges a FOSSILIZE by this boundary's attribution
        validation = validate()
        applier.attribution = validation.attribution
        if monitors is not None:  # judged with the boundary's other monitors, after the apply
            monitors.collapse.note(validation.loss, validation.chance_loss)
        return validation

    return EpochBoundary(
        config=config, position=position, identity=identity, validate=validate_and_note, kasmina=kasmina,
        consult=consult,
        applier=applier, journal=journal, breakers=breakers, conservative=conservative, lr=control.lr,
        nonfinite_steps=lambda: control.aggregator.nonfinite_steps, world=world, timer=timer, profiler=profiler,
        log=log, events=events, on_check=on_check)


def host_policy_spec(config: TolariaConfig, loader: Iterable[Any]) -> dict[str, Any]:
    """The host group's LR policy; cosine and step need the schedule length in optimizer steps."""
    c, lr = config.lr, config.optimizer.lr
    if c.host_policy == "cosine":
        steps = _schedule_steps(config, loader)
        return {"kind": "cosine", "base_lr": lr, "min_lr": lr * c.min_lr_ratio,
                "warmup_steps": min(c.warmup_steps, steps - 1), "total_steps": steps}
    if c.host_policy == "morpho_adaptive":
        return {"kind": "morpho_adaptive", "base_lr": lr}
    if c.host_policy == "step":
        per_epoch = max(1, _schedule_steps(config, loader) // config.run.epochs)
        return {"kind": "step", "base_lr": lr, "step_size": per_epoch * c.step_epochs}
    return {"kind": "constant", "lr": lr}


def _schedule_steps(config: TolariaConfig, loader: Iterable[Any]) -> int:
    """`lr.total_steps` when set, else epochs × optimizer steps per epoch (len(loader) over
    `optimizer.accumulate_steps`, rounded up); a loader without len() must set it."""
    if config.lr.total_steps is not None:
        return config.lr.total_steps
    try:
        per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(
            f"lr.host_policy = {config.lr.host_policy!r} needs the schedule length, but the training loader "
            "has no len(); set lr.total_steps to the number of optimizer steps of the whole run") from None
    k = config.optimizer.accumulate_steps
    return max(1, config.run.epochs * -(-per_epoch // k))


def build_flops(config: TolariaConfig, kasmina: ExecutionLayer, task: Task, train_loader: Iterable[Any],
                val_loader: Iterable[Any], place: Callable[[Any], Any] | None, precision: Precision, *,
                world_size: int) -> TrainingFlops:
    """The run's compute accounting: counted on the first validation batch, scaled to a training step of
    every one of the `world_size` ranks."""
    rows = rows_per_step(train_loader, accumulate=config.optimizer.accumulate_steps, world_size=world_size,
                         fallback=config.data.batch_size)
    return TrainingFlops(model=kasmina.model, kasmina=kasmina, task=task, batches=val_loader, place=place,
                         rows_per_step=rows, morphogenesis=config.run.morphogenesis, autocast=precision.autocast)


def batch_placer(device: torch.device, loader: Iterable[Any]) -> Callable[[Any], Any] | None:
    """What moves a batch onto `device` (non-blocking when the loader pins memory); None on the CPU,
    where batches already are."""
    if device.type == "cpu":
        return None
    non_blocking = bool(getattr(loader, "pin_memory", False))
    return lambda batch: move_batch(batch, device, non_blocking=non_blocking)


def open_bus(run_dir: Path | None, config: TolariaConfig) -> OonaBus:
    """The run's bus when none is given: Redis (spooling what it cannot take) or in-process."""
    if config.oona.url:
        from esper.oona import SPOOL_FILE, RedisBus, SpoolingBus, load_secret

        # What Redis does not take is kept in the run directory, and the first failure is said aloud.
        redis_bus = RedisBus(config.oona.url, secret=load_secret(key_file=config.oona.secret_file or None))
        return SpoolingBus(redis_bus, run_dir / SPOOL_FILE if run_dir is not None else None)
    from esper.oona import InProcessBus

    jsonl = run_dir / "telemetry.jsonl" if run_dir is not None and config.telemetry.jsonl else None
    return InProcessBus(jsonl)  # type: ignore[no-any-return]
