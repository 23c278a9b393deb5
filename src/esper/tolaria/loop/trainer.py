"""`TolariaTrainer`: the training loop. Every side concern is a component called at a named point
(see `hooks.HookPoint` for the loop in pseudocode)."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from esper.contracts import ExecutionLayer, OonaBus, TamiyoClient
from esper.leyline import (
    MESSAGE_PRIORITY_LOW,
    MESSAGE_PRIORITY_NORMAL,
    TELEMETRY_LEVEL_ERROR,
    TELEMETRY_LEVEL_INFO,
    TELEMETRY_LEVEL_WARNING,
    AdaptationCommand,
    new_id,
)
from esper.tolaria.config import ConfigError, TolariaConfig
from esper.tolaria.control.aggregation import AggregationConfig, GradientAggregator
from esper.tolaria.control.breakers import BreakerBoard
from esper.tolaria.control.conservative import ConservativeMode
from esper.tolaria.control.lr import UnifiedLRController
from esper.tolaria.control.optimizer import DynamicOptimizerManager
from esper.tolaria.distributed import World
from esper.tolaria.drills import Drill, FaultPlan, StepDrills, wire_drills
from esper.tolaria.loop.boundary import (
    BoundaryReport,
    EpochBoundary,
    hardware_context,
    journal_command,
    seed_stage_changes,
)
from esper.tolaria.loop.handshake import TamiyoHandshake
from esper.tolaria.loop.hooks import HookPoint
from esper.tolaria.observe.profiling import Profiler
from esper.tolaria.observe.telemetry import TelemetryCollector
from esper.tolaria.observe.timing import MonotonicTimer
from esper.tolaria.recovery.safety import RolledBack, Safety
from esper.tolaria.state.capture import loader_generator, restore_state
from esper.tolaria.state.snapshot import state_checksum

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainerState:
    """Counters that locate the run; everything else is derived or lives in a component."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0


@dataclass
class RunResult:
    epochs_completed: int
    final_val_accuracy: float
    final_val_loss: float
    summary: dict[str, Any]


def factory_from_optimizer(optimizer: torch.optim.Optimizer) -> OptimizerFactory:
    """Turn a constructed `torch.optim` optimizer into a factory of the same class and defaults."""
    cls, defaults = type(optimizer), dict(optimizer.defaults)
    defaults.pop("differentiable", None)
    return lambda groups: cls(groups, **defaults)


class TolariaTrainer:
    """Trains `kasmina.model` with the morphogenetic control loop; `fit()` runs the epochs."""

    def __init__(
        self,
        *,
        kasmina: ExecutionLayer,
        tamiyo: TamiyoClient,
        optimizer: OptimizerFactory | torch.optim.Optimizer,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any],
        loss_fn: LossFn,
        config: TolariaConfig | None = None,
        bus: OonaBus | None = None,
        run_dir: str | Path | None = None,
        faults: FaultPlan | None = None,
        verifier: Callable[[AdaptationCommand], None] | None = None,
        callbacks: Sequence[Any] = (),
        world: World | None = None,
    ) -> None:
        self.config = config or TolariaConfig()
        cfg = self.config
        self.world = world or World()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run_id = f"{cfg.run.name}-{new_id()[:8]}"
        self.faults = faults or FaultPlan()
        self.state = TrainerState()
        bus = bus if bus is not None else _default_bus(self.run_dir if self.world.is_leader else None, cfg)
        tamiyo, kasmina, self.bus, verifier = wire_drills(self.faults, tamiyo=tamiyo, kasmina=kasmina, bus=bus,
                                                          verifier=verifier, epoch_of=lambda: self.state.epoch)
        self.kasmina: ExecutionLayer = kasmina
        self.model: nn.Module = kasmina.model
        self.tamiyo = tamiyo
        self.train_loader, self.val_loader, self.loss_fn = train_loader, val_loader, loss_fn
        sampler = getattr(train_loader, "batch_sampler", None)
        self.sampler = sampler if hasattr(sampler, "state_dict") else None  # resumable position, if any
        self.morphogenesis = cfg.run.morphogenesis
        self.lr = UnifiedLRController(lambda: self.optim.optimizer, tolerance=cfg.lr.tolerance)
        factory = optimizer if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer) \
            else factory_from_optimizer(optimizer)
        self.optim = DynamicOptimizerManager(self.model, factory, self.lr, host_policy=self._host_policy(),
                                             seed_policy_factory=self._seed_policy)
        self.aggregator = GradientAggregator(AggregationConfig.model_validate(cfg.aggregation))
        self.breakers = BreakerBoard(failure_threshold=cfg.breakers.failure_threshold,
                                     cooldown_calls=cfg.breakers.cooldown_calls)
        self.conservative = ConservativeMode(cfg.conservative.healthy_epochs_to_exit)
        b = cfg.boundary
        self.timer = MonotonicTimer({"state_assembly": b.state_assembly_ms, "tamiyo": b.tamiyo_ms,
                                     "apply": b.apply_ms, "check": b.check_ms, "total": b.total_ms})
        self.handshake = TamiyoHandshake(self.tamiyo, timeout_s=cfg.handshake.tamiyo_timeout_s,
                                         command_max_age_s=cfg.handshake.command_max_age_s,
                                         max_abandoned=cfg.handshake.max_abandoned_workers, verifier=verifier)
        self.telemetry = TelemetryCollector(self.bus, queue_size=cfg.telemetry.queue_size)
        self._telemetry_interval = cfg.telemetry.step_interval
        self.profiler = Profiler(cfg.profile.enabled,
                                 trace_path=self.run_dir / "trace.json" if self.run_dir else None)
        self.boundary = EpochBoundary(self)
        self.callbacks = list(callbacks)
        self.hardware = hardware_context()
        self.history: list[dict[str, Any]] = []
        self.seed_history: dict[str, list[dict[str, Any]]] = {}
        self._seed_stage: dict[str, str] = {}
        self.fallbacks: list[dict[str, Any]] = []
        self.apply_failures: list[dict[str, Any]] = []
        self.rollbacks: list[dict[str, Any]] = []
        self.emergencies: list[dict[str, Any]] = []
        self.step_drills = StepDrills(self)
        self.active_drill: Drill | None = None
        self.safety = Safety(self)
        self._stop_signal: str | None = None

    # ---------------------------------------------------------------- the loop
    def fit(self) -> RunResult:
        cfg = self.config
        self._seed_everything(cfg.run.seed)
        self._fire(HookPoint.FIT_BEGIN)
        previous = self._install_signal_handlers()
        try:
            self.safety.start()
            while self.state.epoch < cfg.run.epochs and not self._stop_signal:
                epoch = self.state.epoch
                try:
                    self._fire(HookPoint.EPOCH_BEGIN, epoch=epoch)
                    started = time.perf_counter()
                    train_loss = self._train_epoch(epoch)
                    if self._stop_signal:
                        break
                    self._fire(HookPoint.BOUNDARY_BEGIN, epoch=epoch)
                    self.safety.settle()  # the boundary may change the structure and write weights
                    self.step_drills.before_boundary(epoch)
                    report = self.boundary.run(epoch, train_loss)
                    self._end_epoch(epoch, train_loss, report, time.perf_counter() - started)
                    self.safety.boundary(epoch, report.val_accuracy, report.own_ms)
                    self._fire(HookPoint.BOUNDARY_END, epoch=epoch, report=report)
                except RolledBack:
                    continue  # the state, epoch and data position are the snapshot's now
            if self._stop_signal:
                self.safety.checkpoint_now(f"stopped by {self._stop_signal}")
        finally:
            _restore_signal_handlers(previous)
            self._fire(HookPoint.FIT_END)
        summary = self.summary()
        summary["stopped"] = self._stop_signal or ""
        return RunResult(summary["epochs_completed"], summary["final_val_accuracy"], summary["final_val_loss"],
                         summary)

    def _train_epoch(self, epoch: int) -> float:
        self.model.train()
        total, count = torch.zeros(()), 0
        for x, y in self._epoch_batches(epoch):
            loss = self._run_batch(x, y)
            if loss is not None:
                total += loss
                count += 1
            if self._stop_signal:
                break
        return float(total) / max(count, 1)

    def _epoch_batches(self, epoch: int) -> Iterator[Any]:
        """The loader's iterator from the current position of the epoch.

        Building an iterator draws the DataLoader's base seed (worker seeds) from its generator,
        torch's global one unless the loader has its own. A restart mid-epoch (resume, rollback)
        therefore builds it from the generator state the epoch's first iterator was built from
        (`iterator_rng`, in every snapshot) and then puts the restored state back: the draw, and
        the stream that dropout and augmentation read after it, are those of the uninterrupted run.
        Randomness drawn inside worker processes restarts with the workers (seeded from the base
        seed): exact across a restart at an epoch boundary, not from the middle of an epoch."""
        if self.sampler is not None:
            self.sampler.set_position(epoch, self.state.batch_in_epoch)
        generator = loader_generator(self.train_loader)
        if self.state.batch_in_epoch == 0 or self.iterator_rng is None:
            self.iterator_rng = generator.get_state()
            return iter(self.train_loader)
        restored = generator.get_state()
        generator.set_state(self.iterator_rng)
        try:
            return iter(self.train_loader)
        finally:
            generator.set_state(restored)

    iterator_rng: torch.Tensor | None = None

    def _run_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """One batch of the epoch: hooks, the step, the position counters, the after-step checks."""
        # Consumed, not the sampler's latest: DataLoader workers fetch batches ahead of the loop.
        batch = self.sampler.consume() if self.sampler is not None else self.state.batch_in_epoch
        if self.callbacks:
            self._fire(HookPoint.STEP_BEGIN, step=self.state.global_step)
        loss = self._train_step(x, y, batch)
        self.state.batch_in_epoch = batch + 1
        self.state.global_step += 1
        if self.callbacks:
            self._fire(HookPoint.STEP_END, step=self.state.global_step, loss=loss)
        self.safety.after_step()
        return loss

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor | None:
        """One step; returns the detached host loss, or None when the step was skipped.

        Work that has nothing to do is skipped at the call (no callbacks, one process, no LR
        violation, no telemetry due): Python right after a large kernel runs cache-cold, so each
        call made here costs microseconds, measured at about 1 % of a 1M-parameter CPU step."""
        prof, safety, world, step = self.profiler, self.safety, self.world, self.state.global_step
        safety.watchdog.heartbeat(self.state.epoch, step)
        with prof.span("step.forward"):
            host_loss = self.step_drills.perturb(self.loss_fn(self.model(x), y), self.state.epoch, batch)
        with prof.span("step.seed_losses"):
            terms = self.kasmina.seed_loss_terms(x, y, self.loss_fn) if self.morphogenesis else []
        with prof.span("step.backward"):
            params = self._trainable
            stats = self.aggregator.backward(host_loss, terms, params, host_batch_size=len(y),
                                             check_grads=safety.grad_check_due(step))
        with prof.span("step.monitors"):
            incident = safety.step_incident(stats)
            finite, level, rows = stats.finite, incident.level if incident else 0, len(y)
            if world.distributed:
                finite, level, rows = world.agree_step(finite, level, rows)
            if level:
                self.optim.optimizer.zero_grad(set_to_none=True)
                safety.respond_to_step(incident, level, batch)  # raises RolledBack after a rollback
        with prof.span("step.optimizer"):
            safety.settle()  # the last snapshot's copy-behind must finish before the optimizer writes
            optimizer = self.optim.optimizer
            if finite:
                if world.distributed:
                    world.average_gradients(params.values(), len(y), rows)
                self.lr.step(step)
                optimizer.step()
            else:
                self.record_event("nonfinite_step_skipped", TELEMETRY_LEVEL_WARNING,
                                  step=step, loss=stats.total_loss)
            optimizer.zero_grad(set_to_none=True)
            if self.lr.violations:
                self._check_lr_violations()
        with prof.span("step.kasmina"):
            self.kasmina.on_step()
        interval = self._telemetry_interval
        if interval and step % interval == 0:
            with prof.span("step.telemetry"):
                self._step_telemetry(stats.total_loss, stats.grad_norm)
        return host_loss.detach() if finite else None

    def _step_telemetry(self, loss: float, grad_norm: float) -> None:
        """One LOW-priority packet of step metrics (dropped first under pressure); the step calls
        this every `telemetry.step_interval` steps."""
        packet = self.telemetry.packet({"tolaria.step.loss": loss, "tolaria.step.grad_norm": grad_norm},
                                       attributes={"step": str(self.state.global_step)})
        self.telemetry.publish(packet, MESSAGE_PRIORITY_LOW)

    # ---------------------------------------------------------------- boundary helpers
    def validate(self) -> tuple[float, float]:
        self.model.eval()
        loss_sum, correct, n = 0.0, 0, 0
        with torch.no_grad():
            for x, y in self.val_loader:
                out = self.model(x)
                count = y.numel()  # targets [B] for classifiers, [B, T] for sequence models
                loss_sum += float(self.loss_fn(out, y)) * count
                correct += int((out.argmax(dim=-1) == y).sum())
                n += count
        self.model.train()
        val_loss, val_accuracy = loss_sum / max(n, 1), correct / max(n, 1)
        self.lr.report_validation(val_loss)
        return val_loss, val_accuracy

    def apply_command(self, command: AdaptationCommand, report: BoundaryReport, *, journal: bool = True) -> None:
        """Apply through Kasmina; a raise is recorded and escalated and the model must be unchanged.
        The command is journaled in the WAL first (durable), so a resume can replay it."""
        breaker = self.breakers["kasmina"]
        if journal:
            journal_command(self, command, report.epoch)
        before = self._structure_fingerprint()
        try:
            result = self.kasmina.apply_command(command)
        except Exception as exc:  # noqa: BLE001 - any failure of the execution layer is recorded here
            opened = breaker.record_failure(f"{type(exc).__name__}: {exc}")
            unchanged = self._structure_fingerprint() == before
            self.apply_failures.append({"epoch": report.epoch, "command_id": command.command_id,
                                        "error": f"{type(exc).__name__}: {exc}", "model_unchanged": unchanged})
            self.record_event("kasmina_apply_failed", TELEMETRY_LEVEL_ERROR, command_id=command.command_id,
                              error=str(exc), model_unchanged=unchanged, breaker_opened=opened)
            self.faults.record(getattr(exc, "drill", None), f"recorded, breaker notified; model_unchanged={unchanged}")
            report.apply_reason = f"apply failed: {exc}"
            return
        breaker.record_success()
        report.applied, report.apply_reason = result.ok, result.reason
        if not result.ok:
            self.record_event("command_rejected", TELEMETRY_LEVEL_WARNING, command_id=command.command_id,
                              reason=result.reason)
            return
        if result.structure_changed:
            rebuilt = self.optim.rebuild(result.added_params, result.removed_params, result.reshaped_params,
                                         result.frozen_params)
            self.record_event("optimizer_rebuilt", TELEMETRY_LEVEL_INFO, ok=rebuilt.ok,
                              added=len(result.added_params), removed=len(result.removed_params),
                              frozen=len(result.frozen_params))
        self.record_event("command_applied", TELEMETRY_LEVEL_INFO, command_id=command.command_id,
                          seed_id=result.seed_id, reason=result.reason)

    def _end_epoch(self, epoch: int, train_loss: float, report: BoundaryReport, seconds: float) -> None:
        self._track_seed_stages(epoch)
        record = {
            "epoch": epoch, "global_step": self.state.global_step, "train_loss": train_loss,
            "val_loss": report.val_loss, "val_accuracy": report.val_accuracy, "lr": self.lr.current(),
            "param_count": self.param_count(), "conservative_mode": self.conservative.active,
            "epoch_seconds": seconds, "boundary_ms": report.own_ms,
            "command": report.command.annotations.get("reason", "") if report.command is not None else "",
        }
        self.history.append(record)
        metrics: dict[str, float] = {
            "tolaria.epoch.duration_ms": seconds * 1e3, "tolaria.boundary.latency_ms": report.own_ms,
            "tolaria.train.loss": train_loss, "tolaria.val.loss": report.val_loss,
            "tolaria.val.accuracy": report.val_accuracy, "tolaria.model.params": float(self.param_count())}
        metrics.update({f"tolaria.lr_controller.lr.{k}": v for k, v in self.lr.current().items()})
        self.telemetry.publish(self.telemetry.packet(metrics, attributes={"epoch": str(epoch)}),
                               MESSAGE_PRIORITY_NORMAL)

    def _track_seed_stages(self, epoch: int) -> None:
        states = self.kasmina.export_seed_states()
        changes = seed_stage_changes(self._seed_stage, states)
        present = {s.seed_id for s in states}
        # Culled seeds leave Kasmina's export: their last stage is CULLED.
        changes.update({sid: "CULLED" for sid, stage in self._seed_stage.items()
                        if sid not in present and stage != "CULLED"})
        for seed_id, stage in changes.items():
            self._seed_stage[seed_id] = stage
            self.seed_history.setdefault(seed_id, []).append({"epoch": epoch, "stage": stage})

    # ---------------------------------------------------------------- small helpers
    @property
    def _trainable(self) -> dict[str, nn.Parameter]:
        """The parameters the optimizer holds, by name (every trainable one; a frozen one leaves it),
        re-read only when the optimizer is rebuilt (growth, fossilize, cull, restore)."""
        optimizer = self.optim.optimizer
        if self._trainable_for is not optimizer:
            self._trainable_cache = self.optim.named_parameters()
            self._trainable_for = optimizer
        return self._trainable_cache

    _trainable_for: object = None
    _trainable_cache: dict[str, nn.Parameter] = {}

    def param_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _structure_fingerprint(self) -> tuple[Any, ...]:
        return tuple((n, tuple(p.shape), p.requires_grad) for n, p in self.model.named_parameters())

    def _check_lr_violations(self) -> None:
        for v in self.lr.drain_violations():
            opened = self.breakers["lr_controller"].record_failure(
                f"group {v.group}: lr {v.found:g} written out of band (expected {v.expected:g})")
            self.record_event("lr_out_of_band_write", TELEMETRY_LEVEL_ERROR, group=v.group, expected=v.expected,
                              found=v.found, step=v.step, breaker_opened=opened)
            self.faults.record(self.step_drills.lr_drill, f"detected at step {v.step} and reverted to {v.expected:g}")

    def record_event(self, description: str, level: int = TELEMETRY_LEVEL_INFO,
                     priority: int = MESSAGE_PRIORITY_NORMAL, **attributes: object) -> None:
        self.telemetry.emit_event(description, level, priority, **attributes)

    def _host_policy(self) -> dict[str, Any]:
        return host_policy_spec(self.config, self.train_loader)

    def _seed_policy(self, seed_id: str) -> dict[str, Any]:
        c = self.config.lr
        return {"kind": "seed_warmup", "warmup_steps": max(1, c.seed_warmup_steps), "host_multiplier": c.seed_lr_ratio}

    def _fire(self, hook: HookPoint, **kwargs: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook.value, None)
            if fn is not None:
                fn(self, **kwargs)
        if hook is HookPoint.FIT_END:
            self.close()

    def _seed_everything(self, seed: int) -> None:
        if self.state.global_step or self.resumed_from:
            return  # resumed: RNG states come from the snapshot
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def request_stop(self, reason: str) -> None:
        """Finish the current step, checkpoint, and leave `fit()` (signals and halts use this)."""
        self._stop_signal = reason

    @property
    def stop_requested(self) -> bool:
        return self._stop_signal is not None

    def _install_signal_handlers(self) -> dict[int, Any]:
        def request_stop(signum: int, _frame: Any) -> None:
            self.request_stop(signal.Signals(signum).name)

        previous: dict[int, Any] = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: the embedding application owns signals
            return {}
        return previous

    def summary(self) -> dict[str, Any]:
        from esper.tolaria.observe.summary import build_summary

        return build_summary(self)

    def resume_from(self, directory: Path, *, name: str | None = None) -> None:
        """Restore the newest valid committed checkpoint in `directory` (or exactly the committed
        checkpoint `name`) before `fit()`."""
        snapshot = self.safety.resume_from(directory, name=name)
        if snapshot.state["trainer"].get("config_sha256") != self.config.sha256():
            self.record_event("resume_config_changed", TELEMETRY_LEVEL_WARNING, checkpoint=snapshot.snapshot_id)
        restore_state(self, snapshot.state, keep_records=False)
        self._keep_run_id(snapshot.state["trainer"].get("run_id"), directory)
        self.resumed_from = snapshot.snapshot_id

    resumed_from = ""

    def _keep_run_id(self, saved: str | None, directory: Path) -> None:
        """A run resumed from its own checkpoints keeps its id: a remote Tamiyo keeps its controller,
        and manifests and emergency signals name one run. A branch into another run directory is a
        new run with its own id."""
        own = self.safety.checkpoint_dir
        if saved and (own is None or Path(directory).resolve() == own.resolve()):
            self.run_id = saved
            self.safety.adopt_run_id(saved)

    def close(self) -> None:
        self.safety.close()
        self.telemetry.close()
        self.handshake.close()
        self.profiler.close() if hasattr(self.profiler, "close") else None
        close = getattr(self.bus, "close", None)
        if close is not None:
            close()

    def final_state_sha256(self) -> str:
        return state_checksum(self.model.state_dict())


def _restore_signal_handlers(previous: Mapping[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


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
    """`lr.total_steps` when set, else epochs × len(loader); a loader without len() must set it."""
    if config.lr.total_steps is not None:
        return config.lr.total_steps
    try:
        per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(
            f"lr.host_policy = {config.lr.host_policy!r} needs the schedule length, but the training loader "
            "has no len(); set lr.total_steps to the number of optimizer steps of the whole run") from None
    return max(1, config.run.epochs * per_epoch)


def _default_bus(run_dir: Path | None, config: TolariaConfig) -> OonaBus:
    if config.oona.url:
        from esper.oona import SPOOL_FILE, RedisBus, SpoolingBus, load_secret

        # What Redis does not take is kept in the run directory, and the first failure is said aloud.
        redis_bus = RedisBus(config.oona.url, secret=load_secret(key_file=config.oona.secret_file or None))
        return SpoolingBus(redis_bus, run_dir / SPOOL_FILE if run_dir is not None else None)
    from esper.oona import InProcessBus

    jsonl = run_dir / "telemetry.jsonl" if run_dir is not None and config.telemetry.jsonl else None
    return InProcessBus(jsonl)  # type: ignore[no-any-return]
