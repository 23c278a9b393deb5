"""`TolariaTrainer`: the training loop. Every side concern is a component called at a named point
(see `hooks.HookPoint` for the loop in pseudocode); `wiring` builds them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esper.contracts import ExecutionLayer, OonaBus, TamiyoClient
from esper.leyline import TELEMETRY_LEVEL_WARNING, AdaptationCommand, new_id
from esper.tolaria.config import TolariaConfig
from esper.tolaria.control.lr import record_lr_violations
from esper.tolaria.distributed import World
from esper.tolaria.drills import DrillRig, DrillTargets, FaultPlan
from esper.tolaria.loop import wiring
from esper.tolaria.loop.batches import EpochBatches
from esper.tolaria.loop.boundary import BoundaryReport, param_count, seed_stages
from esper.tolaria.loop.evaluate import Validation, attributable, evaluate
from esper.tolaria.loop.hooks import HookPoint
from esper.tolaria.loop.precision import Precision, resolve_device
from esper.tolaria.loop.run_state import TrainerSection, register_state, resume_run
from esper.tolaria.loop.signals import stop_on_signals
from esper.tolaria.loop.step import StepCompute
from esper.tolaria.observe.profiling import Profiler
from esper.tolaria.observe.runlog import EpochRecord, RunLog
from esper.tolaria.observe.summary import build_summary, write_config, write_summary
from esper.tolaria.observe.telemetry import TelemetryCollector
from esper.tolaria.observe.timing import event_factory
from esper.tolaria.recovery.loss_readback import defers_reads
from esper.tolaria.recovery.safety import RolledBack
from esper.tolaria.state.position import RunIdentity, StopRequest, TrainerState
from esper.tolaria.state.rng import seed_everything
from esper.tolaria.state.snapshot import state_checksum
from esper.tolaria.tasks import ClassificationTask, Criterion, Task


@dataclass
class RunResult:
    epochs_completed: int
    final_val_accuracy: float
    final_val_loss: float
    summary: dict[str, Any]


class TolariaTrainer:
    """Trains `kasmina.model` with the morphogenetic control loop; `fit()` runs the epochs. `task` says what
    a step computes (default: classification with `loss_fn`, cross-entropy unless given)."""

    def __init__(self, *, kasmina: ExecutionLayer, tamiyo: TamiyoClient,
                 optimizer: wiring.OptimizerFactory | torch.optim.Optimizer, train_loader: Iterable[Any],
                 val_loader: Iterable[Any], task: Task | None = None, loss_fn: Criterion | None = None,
                 config: TolariaConfig | None = None, bus: OonaBus | None = None,
                 run_dir: str | Path | None = None, faults: FaultPlan | None = None,
                 verifier: Callable[[AdaptationCommand], None] | None = None, callbacks: Sequence[Any] = (),
                 world: World | None = None) -> None:
        self.config = cfg = config or TolariaConfig()
        self.world = world or World()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.identity = RunIdentity(f"{cfg.run.name}-{new_id()[:8]}", cfg.run.name, cfg.sha256())
        self.state, self.stop, self.log = TrainerState(), StopRequest(), RunLog()
        self.drills = DrillRig(faults or FaultPlan())
        bus = bus if bus is not None else wiring.open_bus(self.run_dir if self.world.is_leader else None, cfg)
        tamiyo, kasmina, self.bus, verifier = self.drills.wrap(tamiyo=tamiyo, kasmina=kasmina, bus=bus,
                                                               verifier=verifier, epoch_of=lambda: self.state.epoch)
        self.kasmina, self.tamiyo, self.model = kasmina, tamiyo, kasmina.model
        tamiyo_state = wiring.stateful_or_none(tamiyo)  # a controller may keep state of its own, or not
        self.task = task if task is not None else ClassificationTask(loss_fn=loss_fn)
        self.device = resolve_device(cfg.run.device, self.world.size)
        self.model.to(self.device)  # parameters stay the same objects: an optimizer built over them still holds them
        self.precision = Precision(cfg.run.precision, self.device)
        self.place = wiring.batch_placer(self.device, train_loader)
        self.val_loader, self._step_interval = val_loader, cfg.telemetry.step_interval  # the interval: read per step
        # The loss of the host's forward, (output, batch) -> loss: the task's, as drills perturb it.
        self.host_loss = self.drills.wrap_loss(lambda out, batch: self.task.loss(out, batch)) or self.task.loss
        self.batches = EpochBatches(train_loader, self.state, accumulate=cfg.optimizer.accumulate_steps)
        c = wiring.build_control(cfg, self.model, wiring.optimizer_factory(optimizer), train_loader)
        self.lr, self.optim, self.aggregator, self.breakers, self.conservative = \
            c.lr, c.optim, c.aggregator, c.breakers, c.conservative
        device_events = event_factory(self.device)  # CUDA timing events on a CUDA run, else the wall clock
        self.timer = wiring.boundary_timer(cfg, device_events)
        self.telemetry = TelemetryCollector(self.bus, queue_size=cfg.telemetry.queue_size, run_id=self.identity.run_id)
        self.events = self.telemetry.emit_event
        self.profiler = Profiler(cfg.profile.enabled, trace_path=self.run_dir / "trace.json" if self.run_dir else None,
                                 events=device_events)
        self.monitors = wiring.build_monitors(cfg)
        self.registry = register_state(
            kasmina=kasmina, optim=self.optim, lr=self.lr, monitors=self.monitors, batches=self.batches,
            trainer=TrainerSection(self.state, self.log, self.identity),
            others={"aggregator": self.aggregator, "breakers": self.breakers, "conservative": self.conservative,
                    "tamiyo": tamiyo_state, "precision": self.precision if self.precision.scaler else None})
        r = wiring.build_recovery(
            cfg, run_dir=self.run_dir, store_fault=self.drills.disk_fault(lambda: self.state.epoch),
            identity=self.identity, position=self.state, world=self.world, registry=self.registry, task=self.task,
            kasmina=kasmina, tamiyo=tamiyo_state, control=c, monitors=self.monitors, log=self.log,
            events=self.events, publish_emergency=self.telemetry.publish_emergency, timer=self.timer,
            profiler=self.profiler, skip_batch=self.batches.skip if self.batches.sampler else None, stop=self.stop)
        self.journal, self.checkpoints, self.safety = r.journal, r.checkpoints, r.safety
        self.handshake = wiring.build_handshake(cfg, tamiyo, verifier)
        self.boundary = wiring.build_boundary(
            cfg, position=self.state, identity=self.identity, kasmina=kasmina, handshake=self.handshake, control=c,
            journal=self.journal, validate=self.validate, timer=self.timer, profiler=self.profiler, log=self.log,
            events=self.events, world=self.world, monitors=self.monitors,
            on_check=lambda epoch, report: self._fire(HookPoint.BOUNDARY_CHECK, epoch=epoch, report=report))
        targets = DrillTargets(
            position=self.state, model=self.model, optimizer=lambda: self.optim.optimizer, lr_now=self.lr.current,
            loss_baseline=lambda: self.monitors.loss.baseline, watchdog=self.safety.watchdog,
            checkpoints=self.checkpoints, log=self.log, events=self.events,
            stall_boundary_s=cfg.boundary.total_ms * 2 / 1000, breaker_threshold=cfg.breakers.failure_threshold)
        self.compiled = wiring.compile_watch(cfg, kasmina)  # after .to(device): compiles for where it runs
        self.callbacks = [*callbacks, *self.drills.callbacks(targets), *([self.compiled] if self.compiled else [])]
        self.compute = StepCompute(model=self.model, task=self.task, kasmina=kasmina, aggregator=self.aggregator,
                                   precision=self.precision, morphogenesis=cfg.run.morphogenesis,
                                   profiler=self.profiler, optimizer=lambda: self.optim.optimizer,
                                   accumulate=cfg.optimizer.accumulate_steps,
                                   defer_reads=defers_reads(cfg.run.loss_readback, self.device, self.world.size),
                                   reduce=self.world.reduce_gradients if self.world.distributed else None)
        self.flops = wiring.build_flops(cfg, kasmina, self.task, train_loader, val_loader, self.place, self.precision,
                                        world_size=self.world.size)
        self.resumed_from, self._closed = "", False  # the snapshot id a resume started from

    # ---------------------------------------------------------------- the loop
    def fit(self) -> RunResult:
        if not (self.state.global_step or self.resumed_from):  # resumed: RNG states come from the snapshot
            seed_everything(self.config.run.seed)
        records = self.run_dir if self.world.is_leader else None  # where config.json and summary.json go
        if records is not None:
            write_config(self.config, records)  # `tolaria report/inspect/resume` read the directory alike
        self.telemetry.run_started(self.run_id, self.state, self.config.run.epochs, self.resumed_from)
        try:
            self._fire(HookPoint.FIT_BEGIN)
            with stop_on_signals(self.safety.signals):  # under torchrun, served at the next vote
                self._run_epochs()
        except BaseException as exc:
            self._fire(HookPoint.FIT_END)
            self.telemetry.run_ended("failed", self.state, reason=f"{type(exc).__name__}: {exc}")
            self.close()
            raise
        self._fire(HookPoint.FIT_END)
        self.safety.flush()
        self.telemetry.run_ended("stopped" if self.stop.requested else "finished", self.state, reason=self.stop.reason)
        self.telemetry.flush()
        summary = {**self.summary(), "stopped": self.stop.reason or ""}  # before close: components still open
        self.close()
        if records is not None:
            write_summary(summary, records)
        return RunResult(summary["epochs_completed"], summary["final_val_accuracy"], summary["final_val_loss"],
                         summary)

    def _run_epochs(self) -> None:
        self.safety.start(resumed=bool(self.resumed_from))
        while self.state.epoch < self.config.run.epochs and not self.stop.requested:
            epoch = self.state.epoch
            try:
                self._fire(HookPoint.EPOCH_BEGIN, epoch=epoch)
                self.flops.observe()  # counts only a structure it has not just counted
                started = time.perf_counter()
                train_loss = self._train_epoch()
                if self.stop.requested:
                    break
                self.safety.before_boundary()  # late step checks read; the boundary may write weights
                self._fire(HookPoint.BOUNDARY_BEGIN, epoch=epoch)
                report = self.boundary.run(epoch, train_loss)
                self._end_epoch(epoch, train_loss, report, time.perf_counter() - started)
                self.safety.boundary(epoch, report.val_accuracy, report.own_ms)
                self._fire(HookPoint.BOUNDARY_END, epoch=epoch, report=report)
            except RolledBack:
                continue  # the state, epoch and data position are the snapshot's now
        if self.stop.requested:
            self.safety.checkpoint_now(f"stopped by {self.stop.reason}")

    def _train_epoch(self) -> float:
        self.model.train()
        total, count = torch.zeros((), device=self.device), 0
        for micro, indices in self.batches.steps():
            loss = self._run_batch(micro if self.place is None else [self.place(b) for b in micro], indices)
            if loss is not None:
                total += loss
                count += 1
            if self.stop.requested:
                break
        return float(total) / max(count, 1)

    def _run_batch(self, micro: list[Any], indices: list[int]) -> torch.Tensor | None:
        """One optimizer step's batches: hooks, the step, the position counters, the after-step checks."""
        self.state.batch_in_epoch = indices[0]  # the step being trained
        if self.callbacks:
            self._fire(HookPoint.STEP_BEGIN, step=self.state.global_step)
        loss = self._train_step(micro, indices)
        self.state.batch_in_epoch = indices[-1] + 1
        self.state.global_step += 1
        if self.callbacks:
            self._fire(HookPoint.STEP_END, step=self.state.global_step, loss=loss)
        self.safety.after_step()
        return loss

    def _train_step(self, micro: list[Any], indices: list[int]) -> torch.Tensor | None:
        """One step; returns the detached host loss, or None when the step was skipped.

        Work that has nothing to do is skipped at the call (no callbacks, one process, no LR
        violation, no telemetry due): Python right after a large kernel runs cache-cold, so each
        call made here costs microseconds, measured at about 1 % of a 1M-parameter CPU step."""
        prof, safety, world, step = self.profiler, self.safety, self.world, self.state.global_step
        safety.watchdog.heartbeat(self.state.epoch, step)
        params = self.optim.trainable()
        result = self.compute.run(micro, params, self.host_loss, safety.grad_check_due(step))
        stats = result.stats
        scaler = self.precision.scaler
        overflow = scaler is not None and stats.grad_overflow  # the scaler's business: skipped, scale lowered
        with prof.span("step.monitors"):
            incident = safety.step_incident(stats, indices, overflow_ok=scaler is not None)
            finite, level = stats.finite, incident.level if incident else 0
            if world.distributed:  # every rank's vote: the same incident, stop and freeze for all
                finite, level = safety.agree_step(finite, incident)
            if level:
                self.optim.optimizer.zero_grad(set_to_none=True)
                safety.respond_to_step(incident, level, indices)  # raises RolledBack after a rollback
        with prof.span("step.optimizer"):
            safety.settle()  # the last snapshot's copy-behind must finish before the optimizer writes
            if finite:
                self.lr.step(step)
            elif not overflow:
                self.events("nonfinite_step_skipped", TELEMETRY_LEVEL_WARNING, step=step, loss=stats.total_loss)
            self.precision.step(self.optim.optimizer, finite=finite, overflow=overflow)
            if self.lr.violations:
                record_lr_violations(self.lr, self.breakers["lr_controller"], self.events)
        with prof.span("step.kasmina"):
            self.kasmina.on_step()
        interval = self._step_interval
        if interval and step % interval == 0:
            with prof.span("step.telemetry"):
                self.telemetry.publish_step(step, stats.total_loss, stats.grad_norm)
        return result.host_loss if finite else None

    def _end_epoch(self, epoch: int, train_loss: float, report: BoundaryReport, seconds: float) -> None:
        self.log.add_stage_changes(epoch, seed_stages(self.kasmina.export_seed_states(), self.log.seed_stage))
        command = report.command_line()
        record = EpochRecord(epoch, self.state.global_step, train_loss, report.val_loss, report.val_accuracy,
                             self.lr.current(), param_count(self.model), self.conservative.active, seconds,
                             report.own_ms, command, report.val_metrics, report.attribution)
        record.flops = self.flops.total(self.log.last_epoch, self.state.global_step)
        self.log.add_epoch(record)
        self.telemetry.publish_epoch(record)

    def _fire(self, hook: HookPoint, **kwargs: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook.value, None)  # a callback implements the hooks it wants
            if fn is not None:
                fn(self, **kwargs)

    # ---------------------------------------------------------------- the run's ends and reports
    def validate(self) -> Validation:
        return evaluate(self.model, self.val_loader, self.task, place=self.place, autocast=self.precision.autocast,
                        seeds=attributable(self.kasmina))  # each applied seed's attribution, in the same pass

    def resume_from(self, directory: Path, *, name: str | None = None) -> None:
        """Restore the newest valid committed checkpoint in `directory` (or exactly the committed
        checkpoint `name`) before `fit()`."""
        self.resumed_from = resume_run(directory, name, checkpoints=self.checkpoints, registry=self.registry,
                                       identity=self.identity, adopt_run_id=self.safety.adopt_run_id,
                                       events=self.events)

    @property
    def run_id(self) -> str:
        return self.identity.run_id

    def request_stop(self, reason: str) -> None:
        """Finish the current step, checkpoint, and leave `fit()` (signals and halts use this)."""
        self.stop.request(reason)

    def summary(self) -> dict[str, Any]:
        return build_summary(
            identity=self.identity, config=self.config, log=self.log, position=self.state, kasmina=self.kasmina,
            param_count=self.param_count(), final_state_sha256=self.final_state_sha256(), timer=self.timer,
            bus=self.bus, sections={
                "conservative_mode": self.conservative.summary(), "breakers": self.breakers.summary(),
                "telemetry": self.telemetry.summary(), "safety": self.safety.summary(),
                "resumed_from": self.resumed_from, "world_size": self.world.size,
                "drills": self.drills.plan.summary(), "lr": {"current": self.lr.current()},
                "flops": self.flops.summary(self.log.last_epoch),
                "aggregation": self.aggregator.summary(), **self.compute.summary(),
                "compile": self.compiled.compiled.summary() if self.compiled else None})

    def param_count(self) -> int:
        return param_count(self.model)

    def final_state_sha256(self) -> str:
        return state_checksum(self.model.state_dict())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for part in (self.safety, self.telemetry, self.handshake, self.profiler, self.bus):
            part.close()

