"""The CSV logger: metrics.csv and events.csv parsed back with the csv module."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from logger_runs import logged_config  # type: ignore[import-not-found]


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    with path.open(newline="", encoding="utf-8") as handle:
        return header, list(csv.DictReader(handle))


def test_metrics_csv_has_a_header_and_one_row_per_epoch_matching_the_history(run_logged: Any,
                                                                               tmp_path: Path) -> None:
    trainer = run_logged(logged_config(3, loggers={"csv": {"enabled": True}}), tmp_path)
    header, rows = read_rows(tmp_path / "metrics.csv")
    assert header[:5] == ["epoch", "global_step", "train/loss", "val/loss", "val/accuracy"]
    assert "lr/host" in header and "model/params" in header and "incidents/rollbacks" in header
    assert not any(c.startswith("lr/seed") for c in header), "a seed's own LR is not a column"
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for row, record in zip(rows, trainer.log.epochs, strict=True):
        assert int(row["global_step"]) == record.global_step
        assert float(row["train/loss"]) == record.train_loss  # repr round-trips the float exactly
        assert float(row["val/accuracy"]) == record.val_accuracy
        assert int(float(row["model/params"])) == record.param_count


def test_events_csv_names_each_seed_transition_with_its_reason(run_logged: Any, tmp_path: Path) -> None:
    run_logged(logged_config(3, loggers={"csv": {"enabled": True}}), tmp_path)
    header, rows = read_rows(tmp_path / "events.csv")
    assert header == ["kind", "key", "epoch", "step", "what", "seed_id", "reason"]
    germinated = next(r for r in rows if r["what"] == "GERMINATED")
    assert germinated["kind"] == "seed" and germinated["seed_id"] == "seed1" and germinated["epoch"] == "1"
    assert germinated["reason"].startswith("germinate: val loss plateaued")
    training = next(r for r in rows if r["what"] == "TRAINING")
    assert "SEED_OP_START_TRAINING seed1" in training["reason"]


def test_rollbacks_and_emergencies_are_events_with_their_reasons(run_logged: Any, tmp_path: Path) -> None:
    config = logged_config(3, loggers={"csv": {"enabled": True}}, emergency={"spike_lr_factor": 1.0})
    trainer = run_logged(config, tmp_path, drills=("nan-loss@epoch=1,step=3",))
    _, rows = read_rows(tmp_path / "events.csv")
    emergency = next(r for r in rows if r["kind"] == "emergency")
    assert emergency["what"] == "SEVERE" and "loss_nonfinite" in emergency["reason"]
    rollback = next(r for r in rows if r["kind"] == "rollback")
    assert rollback["what"] == "fast" and "restored epoch" in rollback["reason"]
    assert [r["key"] for r in rows].count(emergency["key"]) == 1, "each incident is logged once"
    assert rows.index(emergency) < rows.index(rollback), "the emergency, then the rollback it led to"
    _, metrics = read_rows(tmp_path / "metrics.csv")
    target = int(rollback["reason"].split("restored epoch ")[1].split()[0])
    assert [int(r["epoch"]) for r in metrics] == [0, *range(target, 3)], "re-run epochs are appended"
    last = {int(r["epoch"]): r for r in metrics}  # the last row of an epoch is the one that counts
    assert [float(last[e]["train/loss"]) for e in range(3)] == [r.train_loss for r in trainer.log.epochs]
    assert metrics[-1]["incidents/rollbacks"] == "1.0"


def test_a_resumed_run_appends_under_the_same_header(run_logged: Any, tmp_path: Path) -> None:
    config = logged_config(3, loggers={"csv": {"enabled": True}, "step_every": 10})
    run_logged(config, tmp_path, stop_after=0)
    header_before, rows_before = read_rows(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows_before] == ["0"]
    run_logged(config, tmp_path, resume=True)
    header, rows = read_rows(tmp_path / "metrics.csv")
    assert header == header_before
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert (tmp_path / "metrics.csv").read_text().count("epoch,global_step") == 1
    _, steps = read_rows(tmp_path / "step_metrics.csv")
    assert [int(r["global_step"]) for r in steps][:3] == [10, 20, 30] and all(r["train/step_loss"] for r in steps)
    assert (tmp_path / "step_metrics.csv").read_text().count("global_step,") == 1
