"""The W&B logger offline: no network, no account; the run directory W&B writes, and its records
read back from the run's .wandb file (LevelDB's log format: 32 KiB blocks of framed records)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from logger_runs import logged_config  # type: ignore[import-not-found]

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

BLOCK, HEADER = 32768, 7  # the file starts with ":W&B", a 2-byte magic and a version byte
FULL, LAST = 1, 4


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    (tmp_path / "wandb-home").mkdir()
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wandb-home"),
                       "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                       "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path / "wandb-home"


def records(path: Path) -> list[Any]:
    data, out, pending, pos = path.read_bytes(), [], b"", HEADER
    assert data[:4] == b":W&B"
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pending += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)  # this W&B writes each key as a one-part nested key


def history(run_file: Path) -> list[dict[str, Any]]:
    rows = [r.history for r in records(run_file) if r.WhichOneof("record_type") == "history"]
    return [{key(item): json.loads(item.value_json) for item in row.item} for row in rows]


def test_an_offline_run_writes_its_directory_with_history_config_and_events(run_logged: Any, offline: Path,
                                                                            tmp_path: Path) -> None:
    trainer = run_logged(logged_config(3, loggers={"wandb": {"enabled": True}}), tmp_path / "run")
    (run_dir,) = (offline / "wandb").glob(f"offline-run-*-{trainer.run_id}")
    run_file = run_dir / f"run-{trainer.run_id}.wandb"
    assert run_file.stat().st_size > 0 and (run_dir / "logs" / "debug.log").is_file()
    rows = [row for row in history(run_file) if "train/loss" in row]
    assert [row["epoch"] for row in rows] == [0, 1, 2]
    assert [row["global_step"] for row in rows] == [r.global_step for r in trainer.log.epochs]
    assert rows[0]["train/loss"] == pytest.approx(trainer.log.epochs[0].train_loss)
    (run,) = [r.run for r in records(run_file) if r.WhichOneof("record_type") == "run"]
    config = {key(item): json.loads(item.value_json) for item in run.config.update}
    assert config["optimizer"]["lr"] == 0.02 and config["run"]["epochs"] == 3 and run.run_id == trainer.run_id
    summary = [item for r in records(run_file) if r.WhichOneof("record_type") == "summary" for item in r.summary.update]
    germinated = [json.loads(i.value_json) for i in summary if key(i) == "seed.seed1.GERMINATED"]
    assert germinated and "germinate: val loss plateaued" in germinated[-1]


def test_a_resumed_run_keeps_its_wandb_run_id(run_logged: Any, offline: Path, tmp_path: Path) -> None:
    config = logged_config(3, loggers={"wandb": {"enabled": True}})
    first = run_logged(config, tmp_path / "run", stop_after=0)
    second = run_logged(config, tmp_path / "run", resume=True)
    assert second.run_id == first.run_id
    segments = (offline / "wandb").glob(f"offline-run-*-{first.run_id}*")  # W&B adds -1 on a name clash
    epochs = sorted([row["epoch"] for row in history(d / f"run-{first.run_id}.wandb") if "epoch" in row]
                    for d in segments)
    assert epochs == [[0], [1, 2]], "one segment per process, one W&B id: `wandb sync` joins them"
