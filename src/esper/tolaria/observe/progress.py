"""The console view of `tolaria run`, on stderr.

On a terminal: a live bar per epoch with the epoch (`3/39`: numbered from 0, as everywhere in
Tolaria), the step, it/s, the epoch's and the run's ETA, the running training loss and the last
primary metric. Elsewhere (a pipe, a SLURM log): no bar, one unwrapped line per epoch. Either way,
a line for every emergency, rollback, conservative-mode change and seed transition, when it is
seen (each epoch's start and end: a rollback restarts the epoch, so its line comes first).

Nothing here reads a device tensor: the running loss is the loss monitor's average, already on the
host, so the view adds no synchronisation to a step.
"""

from __future__ import annotations

import time
from collections.abc import Sized
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text


class StepsPerSecond(ProgressColumn):
    """Optimizer steps per second over rich's recent window."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("- it/s" if speed is None else f"{speed:.1f} it/s")


class ConsoleProgress:
    """A trainer callback: the live bar (terminal only), one line per epoch, a line per event."""

    def __init__(self, console: Console | None = None, *, live: bool | None = None) -> None:
        self.console = console or Console(stderr=True, soft_wrap=True)  # soft wrap: a long line stays one line
        self.live = self.console.is_terminal if live is None else live
        whole = Column(no_wrap=True)  # the bar column gives way, never a number
        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}", table_column=whole),
                                 BarColumn(bar_width=24), MofNCompleteColumn(table_column=whole),
                                 StepsPerSecond(table_column=whole), TextColumn("ETA", table_column=whole),
                                 TimeRemainingColumn(table_column=whole),
                                 TextColumn("run {task.fields[run_eta]}  loss {task.fields[loss]}  "
                                            "{task.fields[metric]}", table_column=whole),
                                 console=self.console, transient=True, disable=not self.live)
        self.task: Any = None
        self._seen_emergencies = self._seen_rollbacks = 0
        self._stages: dict[str, str] = {}
        self._conservative = False
        self._started = 0.0
        self._epochs_timed = 0

    # ---------------------------------------------------------------- hooks
    def on_fit_begin(self, trainer: Any) -> None:
        self._seen_emergencies = len(trainer.log.live_emergencies())
        self._seen_rollbacks = len(trainer.log.rollbacks)
        self._stages = dict(trainer.log.seed_stage)
        self._started = time.monotonic()
        self.progress.start()

    def on_epoch_begin(self, trainer: Any, epoch: int) -> None:
        self._print_events(trainer)
        loader = trainer.batches.loader
        steps = -(-len(loader) // trainer.batches.accumulate) if isinstance(loader, Sized) else None
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task("train", total=steps, epoch=_of(epoch, trainer), loss="-",
                                           metric=self._metric(trainer), run_eta=self._run_eta(trainer, epoch))

    def on_step_end(self, trainer: Any, step: int, loss: Any) -> None:
        if self.task is not None:
            running = trainer.monitors.loss.baseline  # a host float: reading it costs no sync
            self.progress.update(self.task, advance=1, loss="-" if running is None else f"{running:.4f}")

    def on_boundary_end(self, trainer: Any, epoch: int, report: Any) -> None:
        self._epochs_timed += 1
        rec = trainer.log.epochs[-1]
        metric = trainer.task.primary_metric  # accuracy, r2, token_accuracy, ...
        value = rec.val_metrics.get(metric, rec.val_accuracy)
        self.console.print(
            f"epoch {_of(epoch, trainer)}  train {rec.train_loss:.4f}  val {rec.val_loss:.4f}  "
            f"{_short(metric)} {value:.4f}  params {rec.param_count:,}  {rec.epoch_seconds:.1f} s  "
            f"boundary {rec.boundary_ms:.2f} ms  [dim]{rec.command or '-'}[/]", highlight=False)
        self._print_events(trainer)
        self._print_transitions(trainer, epoch, rec.conservative_mode)

    def on_fit_end(self, trainer: Any) -> None:
        self._print_events(trainer)
        self.progress.stop()

    # ---------------------------------------------------------------- event lines
    def _print_events(self, trainer: Any) -> None:
        emergencies = trainer.log.live_emergencies()
        for e in emergencies[self._seen_emergencies:]:
            outcome = "[green]ok[/]" if e.get("ok") else "[red]failed[/]"
            self._line("red", f"{e['level'].upper()} {e['kind']} at epoch {e['epoch']} step {e['step']}: "
                       f"{e['reason']} -> {e['action']} {outcome}; {e.get('detail', '')}")
        self._seen_emergencies = len(emergencies)
        for r in trainer.log.rollbacks[self._seen_rollbacks:]:
            self._line("yellow", f"rollback ({r.tier}) from epoch {r.epoch} step {r.step} to "
                       f"{r.target_snapshot_id} (epoch {r.target_epoch}, step {r.target_step})"
                       f"{'' if r.succeeded else ' FAILED: ' + r.failure}")
        self._seen_rollbacks = len(trainer.log.rollbacks)

    def _print_transitions(self, trainer: Any, epoch: int, conservative: bool) -> None:
        for seed_id, stage in trainer.log.seed_stage.items():
            if self._stages.get(seed_id) != stage:
                before = self._stages.get(seed_id, "new")
                self._line("cyan", f"seed {seed_id}: {before} -> {stage} at epoch {epoch}")
        self._stages = dict(trainer.log.seed_stage)
        if conservative != self._conservative:
            self._line("yellow", f"conservative mode {'on' if conservative else 'off'} at epoch {epoch}")
            self._conservative = conservative

    def _line(self, colour: str, text: str) -> None:
        self.console.print(f"[{colour}]{text}[/]", highlight=False)

    # ---------------------------------------------------------------- fields
    def _metric(self, trainer: Any) -> str:
        if not trainer.log.epochs:
            return ""
        metric = trainer.task.primary_metric
        rec = trainer.log.epochs[-1]
        return f"{_short(metric)} {rec.val_metrics.get(metric, rec.val_accuracy):.4f}"

    def _run_eta(self, trainer: Any, epoch: int) -> str:
        """The rest of the run at this process's mean epoch time so far."""
        if not self._epochs_timed:
            return "-"
        per_epoch = (time.monotonic() - self._started) / self._epochs_timed
        return _clock(per_epoch * (trainer.config.run.epochs - epoch))


def _of(epoch: int, trainer: Any) -> str:
    return f"{epoch}/{trainer.config.run.epochs - 1}"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _short(metric: str) -> str:
    return {"accuracy": "acc", "token_accuracy": "tok_acc"}.get(metric, metric)
