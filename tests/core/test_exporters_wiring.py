"""The Prometheus exporter is fed by a real run and serves its metrics while the run is live."""

from __future__ import annotations

import socket
import urllib.request
from typing import Any

from trainer_fixtures import small_config  # type: ignore[import-not-found]

from esper.tolaria.observe.exporters import ExporterCallback, PrometheusExporter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_live_run_serves_prometheus_metrics_in_base_units(make_trainer: Any) -> None:
    exporter = PrometheusExporter(_free_port())
    scraped: list[str] = []

    class Scrape:
        def on_boundary_end(self, trainer: Any, epoch: int, report: Any) -> None:
            with urllib.request.urlopen(f"http://127.0.0.1:{exporter.port}/metrics", timeout=5) as response:
                scraped.append(response.read().decode())

    trainer, _ = make_trainer(small_config(run={"epochs": 2}), callbacks=(ExporterCallback(exporter), Scrape()))
    trainer.fit()
    assert len(scraped) == 2
    assert "tolaria_val_accuracy" in scraped[-1] and "tolaria_steps_total" in scraped[-1]
    steps = next(line for line in scraped[-1].splitlines() if line.startswith("tolaria_steps_total "))
    assert float(steps.split()[1]) == trainer.state.global_step
