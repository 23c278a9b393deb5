"""Live metric exporters: a Prometheus scrape endpoint, and TensorBoard scalars for Python callers.

Both take the trainer's per-epoch history record (the dicts of `summary.json["history"]`:
`epoch`, `global_step`, `train_loss`, `val_loss`, `val_accuracy`, `lr` {group: lr}, `param_count`,
`conservative_mode`, `epoch_seconds`, optionally `boundary_ms`) through `on_epoch(record)`.
Missing or non-numeric values are skipped, never exported as zeros.

`on_epoch` also reads optional cumulative totals, so a caller can pass what it already counts:
`rollbacks`, `emergencies`, `telemetry_dropped`, `telemetry_published` (ints, or lists whose
length is the count, or `telemetry: {"published", "dropped"}` as in the summary).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from esper.tolaria.observe.loggers.tensorboard_logger import summary_writer_class

# Epoch-boundary latency buckets, seconds: the design budget is 18 ms, the goals far tighter.
BOUNDARY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.018, 0.025, 0.05, 0.1, 0.25, 1.0)


def _number(value: Any) -> float | None:
    """A finite float, or None for missing, null, non-numeric or non-finite values."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _total(record: Mapping[str, Any], key: str) -> int | None:
    """A cumulative count given as an int or as the list of the things counted."""
    value = record.get(key)
    if isinstance(value, (list, tuple)):
        return len(value)
    number = _number(value)
    return int(number) if number is not None else None


def _telemetry_totals(record: Mapping[str, Any]) -> tuple[int | None, int | None]:
    nested = record.get("telemetry")
    source = nested if isinstance(nested, Mapping) else {}
    published = _total(record, "telemetry_published")
    dropped = _total(record, "telemetry_dropped")
    return (published if published is not None else _total(source, "published"),
            dropped if dropped is not None else _total(source, "dropped"))


# ------------------------------------------------------------------------------ TensorBoard


def _tensorboard_writer_class() -> Callable[..., Any]:
    return summary_writer_class("TensorBoardExporter")


class TensorBoardExporter:
    """Writes one set of scalars per epoch to a TensorBoard log directory (step = epoch).

    Kept for Python callers; a run's TensorBoard output is the TensorBoard logger's
    (`[loggers.tensorboard]`, `observe/loggers/`), which `exporters.tensorboard_dir` now turns on.
    Raises `MissingLoggerPackage` (an ImportError) naming the install when TensorBoard is missing.
    `writer_factory` replaces `torch.utils.tensorboard.SummaryWriter` (tests pass a fake).
    """

    def __init__(self, log_dir: Path, *, writer_factory: Callable[..., Any] | None = None) -> None:
        factory = writer_factory if writer_factory is not None else _tensorboard_writer_class()
        self.log_dir = Path(log_dir)
        self._writer = factory(log_dir=str(self.log_dir))

    def on_epoch(self, record: Mapping[str, Any]) -> None:
        epoch = _number(record.get("epoch"))
        if epoch is None:
            raise ValueError(f"TensorBoardExporter.on_epoch needs the record's integer 'epoch', got {record!r}")
        for tag, value in self._scalars(record).items():
            self._writer.add_scalar(tag, value, int(epoch))
        self._writer.flush()

    @staticmethod
    def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
        named = {"loss/train": "train_loss", "loss/validation": "val_loss", "accuracy/validation": "val_accuracy",
                 "model/parameters": "param_count", "time/epoch_seconds": "epoch_seconds",
                 "time/boundary_ms": "boundary_ms", "state/conservative_mode": "conservative_mode",
                 "state/global_step": "global_step"}
        out = {tag: v for tag, key in named.items() if (v := _number(record.get(key))) is not None}
        lrs = record.get("lr")
        if isinstance(lrs, Mapping):
            out.update({f"lr/{group}": v for group, lr in lrs.items() if (v := _number(lr)) is not None})
        return out

    def close(self) -> None:
        self._writer.close()


# ------------------------------------------------------------------------------ Prometheus


class PrometheusExporter:
    """Serves Tolaria's metrics in the Prometheus text format on `addr:port` while the run is live.

    Uses its own `CollectorRegistry` (so two exporters or a test never collide with the global
    one). Metrics are in base units: seconds, ratios, counts. `port=0` picks a free port; read it
    from `.port` after `start()`.
    """

    def __init__(self, port: int, *, addr: str = "127.0.0.1") -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"PrometheusExporter port must be in 0..65535 (0 = any free port), got {port}")
        self.port = port
        self.addr = addr
        self.registry = CollectorRegistry()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._define_metrics()

    def _define_metrics(self) -> None:
        r = self.registry
        self.epoch = Gauge("tolaria_epoch", "Last completed epoch (0-based).", registry=r)
        self.epoch_duration = Gauge("tolaria_epoch_duration_seconds", "Wall time of the last epoch.", registry=r)
        self.train_loss = Gauge("tolaria_train_loss", "Mean training loss of the last epoch.", registry=r)
        self.val_loss = Gauge("tolaria_val_loss", "Validation loss after the last epoch.", registry=r)
        self.val_accuracy = Gauge("tolaria_val_accuracy", "Validation accuracy (ratio 0..1).", registry=r)
        self.learning_rate = Gauge("tolaria_learning_rate", "Learning rate per parameter group.", ["group"],
                                   registry=r)
        self.parameters = Gauge("tolaria_parameters", "Model parameter count.", registry=r)
        self.conservative = Gauge("tolaria_conservative_mode", "1 while in conservative mode, else 0.", registry=r)
        self.steps = Counter("tolaria_steps", "Optimizer steps taken.", registry=r)
        self.step_loss = Gauge("tolaria_step_loss", "Host loss of the last reported step.", registry=r)
        self.step_duration = Gauge("tolaria_step_duration_seconds", "Wall time of the last reported step.",
                                   registry=r)
        self.telemetry_published = Counter("tolaria_telemetry_published", "Telemetry messages published.",
                                           registry=r)
        self.telemetry_dropped = Counter("tolaria_telemetry_dropped", "Telemetry messages dropped.", registry=r)
        self.rollbacks = Counter("tolaria_rollbacks", "Rollbacks performed.", registry=r)
        self.emergencies = Counter("tolaria_emergencies", "Emergencies handled.", registry=r)
        self.boundary = Histogram("tolaria_boundary_seconds", "Epoch-boundary time (Tolaria's own work).",
                                  ["phase"], buckets=BOUNDARY_BUCKETS, registry=r)

    # -------------------------------------------------------------- serving
    def start(self) -> None:
        """Serve /metrics in a daemon thread; returns once the socket is listening."""
        if self._server is not None:
            raise RuntimeError(f"PrometheusExporter already serving on {self.addr}:{self.port}; call stop() first")
        try:
            self._server, self._thread = start_http_server(self.port, addr=self.addr, registry=self.registry)
        except OSError as exc:
            raise OSError(f"PrometheusExporter cannot listen on {self.addr}:{self.port} ({exc}); "
                          f"choose another port (0 = any free one)") from exc
        self.port = int(self._server.server_port)

    def stop(self) -> None:
        """Stop serving and release the port; a no-op when not started."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server, self._thread = None, None

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/metrics"

    # -------------------------------------------------------------- updates
    def on_step(self, *, loss: float | None = None, seconds: float | None = None, steps: int = 1) -> None:
        """Count `steps` optimizer steps; record the last step's loss and duration when given."""
        if steps < 0:
            raise ValueError(f"PrometheusExporter.on_step steps must be >= 0, got {steps}")
        self.steps.inc(steps)
        if (v := _number(loss)) is not None:
            self.step_loss.set(v)
        if (v := _number(seconds)) is not None:
            self.step_duration.set(v)

    def on_epoch(self, record: Mapping[str, Any]) -> None:
        """Update the gauges from a history record and bring counters up to the totals it carries."""
        for gauge, key in ((self.epoch, "epoch"), (self.epoch_duration, "epoch_seconds"),
                           (self.train_loss, "train_loss"), (self.val_loss, "val_loss"),
                           (self.val_accuracy, "val_accuracy"), (self.parameters, "param_count"),
                           (self.conservative, "conservative_mode")):
            if (v := _number(record.get(key))) is not None:
                gauge.set(v)
        lrs = record.get("lr")
        if isinstance(lrs, Mapping):
            for group, lr in lrs.items():
                if (v := _number(lr)) is not None:
                    self.learning_rate.labels(group=str(group)).set(v)
        if (ms := _number(record.get("boundary_ms"))) is not None:
            self.boundary.labels(phase="total").observe(ms / 1e3)
        published, dropped = _telemetry_totals(record)
        for counter, name, total in (
                (self.steps, "tolaria_steps_total", _total(record, "global_step")),
                (self.rollbacks, "tolaria_rollbacks_total", _total(record, "rollbacks")),
                (self.emergencies, "tolaria_emergencies_total", _total(record, "emergencies")),
                (self.telemetry_published, "tolaria_telemetry_published_total", published),
                (self.telemetry_dropped, "tolaria_telemetry_dropped_total", dropped)):
            self._catch_up(counter, name, total)

    def _catch_up(self, counter: Counter, sample: str, total: int | None) -> None:
        """Raise a counter to a cumulative `total`; counters never go down (a resumed run restarts them)."""
        current = self.registry.get_sample_value(sample) or 0.0
        if total is not None and total > current:
            counter.inc(total - current)


class ExporterCallback:
    """Feeds an exporter from the trainer's named points: start at fit begin, one record per epoch, stop at end."""

    def __init__(self, exporter: PrometheusExporter | TensorBoardExporter) -> None:
        self.exporter = exporter

    def on_fit_begin(self, trainer: Any) -> None:
        if isinstance(self.exporter, PrometheusExporter):
            self.exporter.start()

    def on_boundary_end(self, trainer: Any, epoch: int, report: Any) -> None:
        record = asdict(trainer.log.epochs[-1])
        record.update({"global_step": trainer.state.global_step, "rollbacks": len(trainer.log.rollbacks),
                       "emergencies": len(trainer.log.emergencies()),
                       "telemetry": trainer.telemetry.summary()})
        self.exporter.on_epoch(record)

    def on_fit_end(self, trainer: Any) -> None:
        if isinstance(self.exporter, PrometheusExporter):
            self.exporter.stop()
        else:
            self.exporter.close()
