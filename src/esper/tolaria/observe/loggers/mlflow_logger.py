"""`MlflowLogger`: one MLflow run per Tolaria run, through `MlflowClient` (no global active run).

The run is found again by its tag `tolaria.run_id`, so a resume in the same run directory
(which keeps Tolaria's run id) appends to the same MLflow run; a branch is a new run. Params are
the flattened config (`optimizer.lr`); a value a resume changed (`tolaria resume --epochs`) cannot
be logged again (MLflow params are immutable) and is recorded as the tag `resumed.<param>`.
Events are tags (`seed.seed1.CULLED`: the epoch and the reason) and the artifact events.jsonl.

Without `tracking_uri` the store is a local file store in RUN_DIR/mlruns. MLflow 3 refuses file
stores unless MLFLOW_ALLOW_FILE_STORE is true, so this logger sets it (unless the user set it);
whoever reads the store (`MlflowClient`, `mlflow ui --backend-store-uri`) sets it too.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from esper.tolaria.config import flat_keys
from esper.tolaria.observe.loggers.protocol import RunEvent, RunStart, Status, require

RUN_ID_TAG = "tolaria.run_id"
STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
BATCH = 100  # MLflow's limit of params (and tags) per log_batch call
WANTED_BY = "the MLflow logger (loggers.mlflow.enabled)"


def flatten(config: Mapping[str, Any]) -> dict[str, str]:
    """`{"optimizer": {"lr": 0.01}}` -> `{"optimizer.lr": "0.01"}`: MLflow params are strings; lists
    and empty tables as JSON."""
    return {name: value if isinstance(value, str) else json.dumps(value) for name, value in flat_keys(config).items()}


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    for i in range(0, len(items), BATCH):
        yield items[i:i + BATCH]


class MlflowLogger:
    name = "mlflow"

    def __init__(self, run_dir: Path, *, tracking_uri: str = "", experiment: str = "") -> None:
        self._mlflow = require("mlflow", extra="mlflow", package="mlflow-skinny", wanted_by=WANTED_BY)
        self.tracking_uri = tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        self.experiment = experiment
        self.run_id = ""
        self._client: Any = None
        self._events: list[dict[str, Any]] = []

    def start(self, run: RunStart) -> None:
        if self.tracking_uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = client = self._mlflow.tracking.MlflowClient(tracking_uri=self.tracking_uri)
        name = self.experiment or run.name
        found = client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(name)
        existing = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run.run_id}'",
                                      max_results=1)
        if existing:
            self.run_id = existing[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            self._events = self._saved_events()
        else:
            self.run_id = client.create_run(experiment_id, run_name=run.run_id,
                                            tags={RUN_ID_TAG: run.run_id, "tolaria.run_name": run.name}).info.run_id
        self._log_config(flatten(run.config), existing[0].data.params if existing else {})
        client.set_tag(self.run_id, "tolaria.resumed", str(run.resumed).lower())

    def _log_config(self, params: dict[str, str], logged: Mapping[str, str]) -> None:
        entities = self._mlflow.entities
        new = [entities.Param(k, v) for k, v in params.items() if k not in logged]
        changed = [entities.RunTag(f"resumed.{k}", v) for k, v in params.items() if k in logged and logged[k] != v]
        for chunk in _chunks(new):
            self._client.log_batch(self.run_id, params=chunk)
        for chunk in _chunks(changed):
            self._client.log_batch(self.run_id, tags=chunk)

    def log_epoch(self, epoch: int, step: int, metrics: Mapping[str, float]) -> None:
        self._metrics({"epoch": float(epoch), **metrics}, step)

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        self._metrics(metrics, step)

    def _metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [self._mlflow.entities.Metric(k, v, now, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def log_events(self, events: list[RunEvent]) -> None:
        tags = [self._mlflow.entities.RunTag(e.key, f"epoch {e.epoch}, step {e.step}: {e.what}: {e.reason}")
                for e in events]
        for chunk in _chunks(tags):
            self._client.log_batch(self.run_id, tags=chunk)
        self._events += [asdict(e) for e in events]
        lines = "".join(json.dumps(e, sort_keys=True) + "\n" for e in self._events)
        self._client.log_text(self.run_id, lines, "events.jsonl")

    def _saved_events(self) -> list[dict[str, Any]]:
        """The events.jsonl a previous segment of this run wrote (the artifact is rewritten whole)."""
        if not any(f.path == "events.jsonl" for f in self._client.list_artifacts(self.run_id)):
            return []
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(self._client.download_artifacts(self.run_id, "events.jsonl", scratch))
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]

    def close(self, status: Status) -> None:
        if self._client is not None and self.run_id:
            self._client.set_terminated(self.run_id, status=STATUS[status])
            self._client = None
