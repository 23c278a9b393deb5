"""Exporters: Prometheus scrape endpoint on loopback, TensorBoard scalars (or a clear install hint)."""

from __future__ import annotations

import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from esper.tolaria.observe.exporters import PrometheusExporter, TensorBoardExporter


def _record(epoch: int, **extra: Any) -> dict[str, Any]:
    return {"epoch": epoch, "global_step": 40 * (epoch + 1), "train_loss": 0.5, "val_loss": 0.6,
            "val_accuracy": 0.875, "lr": {"host": 0.01, "seed1": 0.001}, "param_count": 592,
            "conservative_mode": True, "epoch_seconds": 1.25, "boundary_ms": 4.0, **extra}


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        return str(response.read().decode())


def _value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in scrape:\n{text}")


@pytest.fixture()
def exporter() -> Any:
    exp = PrometheusExporter(0)
    exp.start()
    try:
        yield exp
    finally:
        exp.stop()


def test_prometheus_serves_epoch_metrics_in_base_units_on_loopback(exporter: PrometheusExporter) -> None:
    assert exporter.port > 0 and exporter.url.startswith("http://127.0.0.1:")
    exporter.on_epoch(_record(2, rollbacks=[{"tier": "fast"}], emergencies=2,
                              telemetry={"published": 58, "dropped": 3}))
    text = _scrape(exporter.url)
    assert _value(text, "tolaria_epoch_duration_seconds") == 1.25
    assert _value(text, "tolaria_train_loss") == 0.5
    assert _value(text, "tolaria_val_accuracy") == 0.875
    assert _value(text, "tolaria_conservative_mode") == 1.0
    assert _value(text, "tolaria_steps_total") == 120.0
    assert _value(text, "tolaria_rollbacks_total") == 1.0
    assert _value(text, "tolaria_emergencies_total") == 2.0
    assert _value(text, "tolaria_telemetry_dropped_total") == 3.0
    assert _value(text, 'tolaria_learning_rate{group="seed1"}') == 0.001
    assert _value(text, 'tolaria_boundary_seconds_sum{phase="total"}') == pytest.approx(0.004)
    assert _value(text, 'tolaria_boundary_seconds_count{phase="total"}') == 1.0
    assert "# TYPE tolaria_boundary_seconds histogram" in text


def test_counters_follow_cumulative_totals_without_double_counting(exporter: PrometheusExporter) -> None:
    exporter.on_step(loss=0.7, seconds=0.01)
    exporter.on_step(steps=39)
    exporter.on_epoch(_record(0, rollbacks=1))  # 40 steps already counted
    exporter.on_epoch(_record(0, rollbacks=1))  # the same totals again count nothing
    text = _scrape(exporter.url)
    assert _value(text, "tolaria_steps_total") == 40.0
    assert _value(text, "tolaria_rollbacks_total") == 1.0
    assert _value(text, "tolaria_step_loss") == 0.7
    exporter.on_epoch(_record(1, rollbacks=3))
    exporter.on_epoch(_record(0, rollbacks=0))  # a lower total never makes a counter go down
    text = _scrape(exporter.url)
    assert _value(text, "tolaria_steps_total") == 80.0
    assert _value(text, "tolaria_rollbacks_total") == 3.0


def test_missing_and_null_values_are_not_exported_as_zero(exporter: PrometheusExporter) -> None:
    exporter.on_epoch(_record(0))
    exporter.on_epoch({"epoch": 1, "train_loss": None, "val_accuracy": float("nan")})
    text = _scrape(exporter.url)
    assert _value(text, "tolaria_train_loss") == 0.5
    assert _value(text, "tolaria_val_accuracy") == 0.875
    assert _value(text, "tolaria_epoch") == 1.0


def test_boundary_histogram_and_stop_releases_the_port() -> None:
    exp = PrometheusExporter(0)
    exp.start()
    exp.on_epoch({"epoch": 0, "boundary_ms": 3.0})
    assert _value(_scrape(exp.url), 'tolaria_boundary_seconds_count{phase="total"}') == 1.0
    port = exp.port
    exp.stop()
    exp.stop()  # idempotent
    with pytest.raises(OSError):  # nobody listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the scrape left a TIME_WAIT behind
        sock.bind(("127.0.0.1", port))  # free again


def test_two_exporters_have_separate_registries_and_a_taken_port_is_a_clear_error() -> None:
    first = PrometheusExporter(0)
    first.start()
    try:
        second = PrometheusExporter(first.port)
        with pytest.raises(OSError, match="cannot listen on 127.0.0.1"):
            second.start()
        with pytest.raises(RuntimeError, match="already serving"):
            first.start()
    finally:
        first.stop()
    with pytest.raises(ValueError, match="port must be in 0..65535"):
        PrometheusExporter(70_000)


class _FakeWriter:
    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        self.flushes = 0

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


def test_tensorboard_writes_scalars_per_epoch(tmp_path: Path) -> None:
    writers: list[_FakeWriter] = []

    def factory(log_dir: str) -> _FakeWriter:
        writers.append(_FakeWriter(log_dir))
        return writers[-1]

    exp = TensorBoardExporter(tmp_path / "tb", writer_factory=factory)
    exp.on_epoch(_record(3, val_loss=None))
    exp.close()
    writer = writers[0]
    assert writer.log_dir == str(tmp_path / "tb")
    scalars = {tag: (value, step) for tag, value, step in writer.scalars}
    assert scalars["loss/train"] == (0.5, 3)
    assert scalars["accuracy/validation"] == (0.875, 3)
    assert scalars["lr/seed1"] == (0.001, 3)
    assert scalars["model/parameters"] == (592.0, 3)
    assert "loss/validation" not in scalars
    assert writer.flushes == 1 and writer.closed
    with pytest.raises(ValueError, match="needs the record's integer 'epoch'"):
        exp.on_epoch({"train_loss": 1.0})


def test_tensorboard_missing_names_the_package_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` meets when it is absent
    with pytest.raises(ImportError, match=r'pip install "esper-tolaria\[tensorboard\]"'):
        TensorBoardExporter(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()
