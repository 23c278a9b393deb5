"""Rich progress bars for `tolaria run`: one bar per epoch, and a line per boundary."""

from __future__ import annotations

from collections.abc import Sized
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RichProgress:
    """A trainer callback; prints nothing but the bars and one line per epoch."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                                 console=self.console, transient=True)
        self.task: Any = None

    def on_fit_begin(self, trainer: Any) -> None:
        self.progress.start()

    def on_epoch_begin(self, trainer: Any, epoch: int) -> None:
        loader = trainer.batches.loader
        total = len(loader) if isinstance(loader, Sized) else None
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task("train", total=total, epoch=epoch, loss="-")

    def on_step_end(self, trainer: Any, step: int, loss: Any) -> None:
        if self.task is not None:
            self.progress.advance(self.task)

    def on_boundary_end(self, trainer: Any, epoch: int, report: Any) -> None:
        rec = trainer.log.epochs[-1]
        flags = " [yellow]conservative[/]" if rec.conservative_mode else ""
        command = rec.command or "-"
        metric = trainer.task.primary_metric  # accuracy, r2, token_accuracy, ...
        self.console.print(
            f"epoch {epoch:3d}  train {rec.train_loss:.4f}  val {rec.val_loss:.4f}  "
            f"{_short(metric)} {rec.val_metrics.get(metric, rec.val_accuracy):.4f}"
            f"  params {rec.param_count:,}  boundary {rec.boundary_ms:.2f} ms"
            f"{flags}  [dim]{command}[/]", highlight=False)

    def on_fit_end(self, trainer: Any) -> None:
        self.progress.stop()


def _short(metric: str) -> str:
    return {"accuracy": "acc", "token_accuracy": "tok_acc"}.get(metric, metric)
