"""The MLflow logger: the local file store under the run directory, read back with MlflowClient."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from logger_runs import logged_config  # type: ignore[import-not-found]

mlflow_tracking = pytest.importorskip("mlflow.tracking")

ALLOW = "MLFLOW_ALLOW_FILE_STORE"


@pytest.fixture(autouse=True)
def no_file_store_opt_in() -> Iterator[None]:
    """Each test starts as a user would, without MLflow 3's file-store opt-in: the logger sets it for
    its own store (the readers below then run in that process); it is put back afterwards."""
    before = os.environ.pop(ALLOW, None)
    yield
    os.environ.pop(ALLOW, None)
    if before is not None:
        os.environ[ALLOW] = before


def only_run(store: Path, experiment: str = "unit") -> Any:
    client = mlflow_tracking.MlflowClient(tracking_uri=store.as_uri())
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {store}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def history(client: Any, run: Any, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


def test_metrics_params_tags_and_events_read_back(run_logged: Any, tmp_path: Path) -> None:
    trainer = run_logged(logged_config(3, loggers={"mlflow": {"enabled": True}}), tmp_path)
    client, run = only_run(tmp_path / "mlruns")
    records = trainer.log.epochs
    assert history(client, run, "train/loss") == [(r.global_step, pytest.approx(r.train_loss)) for r in records]
    assert [v for _, v in history(client, run, "epoch")] == [0.0, 1.0, 2.0]
    assert run.data.params["optimizer.lr"] == "0.02" and run.data.params["run.epochs"] == "3"
    assert run.data.params["model.hidden"] == "[8]"
    assert run.data.tags["tolaria.run_id"] == trainer.run_id and run.info.run_name == trainer.run_id
    assert run.data.tags["seed.seed1.GERMINATED"].startswith("epoch 1, step")
    assert "germinate: val loss plateaued" in run.data.tags["seed.seed1.GERMINATED"]
    assert run.info.status == "FINISHED"
    events = client.download_artifacts(run.info.run_id, "events.jsonl", str(tmp_path / "dl"))
    kinds = [json.loads(line)["what"] for line in Path(events).read_text().splitlines()]
    assert kinds[:2] == ["GERMINATED", "TRAINING"]


def test_a_resumed_run_continues_the_same_mlflow_run(run_logged: Any, tmp_path: Path) -> None:
    config = logged_config(3, loggers={"mlflow": {"enabled": True}})
    first = run_logged(config, tmp_path, stop_after=0)
    client, run = only_run(tmp_path / "mlruns")
    assert run.info.status == "KILLED", "a stopped run is not finished"
    second = run_logged(config, tmp_path, resume=True)
    assert second.run_id == first.run_id
    client, resumed = only_run(tmp_path / "mlruns")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert [s for s, _ in history(client, resumed, "train/loss")] == [r.global_step for r in second.log.epochs]
    assert resumed.data.tags["tolaria.resumed"] == "true"


def test_a_tracking_uri_is_used_instead_of_the_run_directory(run_logged: Any, tmp_path: Path) -> None:
    store = tmp_path / "shared-store"
    config = logged_config(2, loggers={"mlflow": {"enabled": True, "tracking_uri": store.as_uri(),
                                                  "experiment": "digits"}})
    run_logged(config, tmp_path / "run")
    client, run = only_run(store, "digits")
    assert len(history(client, run, "val/loss")) == 2
    assert not (tmp_path / "run" / "mlruns").exists()
