"""The TensorBoard logger: event files read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from logger_runs import logged_config  # type: ignore[import-not-found]

from esper.tolaria.observe.loggers import loggers_from_config

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_board(log_dir: Path) -> Any:
    board = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    board.Reload()
    return board


def scalars(board: Any, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in board.Scalars(tag)]


def texts(board: Any, tag: str) -> list[str]:
    return [e.tensor_proto.string_val[0].decode() for e in board.Tensors(f"{tag}/text_summary")]  # add_text names it so


def test_epoch_metrics_events_and_config_read_back(run_logged: Any, tmp_path: Path) -> None:
    config = logged_config(3, loggers={"tensorboard": {"enabled": True}, "step_every": 10})
    trainer = run_logged(config, tmp_path)
    board = read_board(tmp_path / "tensorboard")
    history = trainer.log.epochs
    assert scalars(board, "train/loss") == [(r.global_step, pytest.approx(r.train_loss)) for r in history]
    assert scalars(board, "val/accuracy") == [(r.global_step, pytest.approx(r.val_accuracy)) for r in history]
    assert [v for _, v in scalars(board, "epoch")] == [0.0, 1.0, 2.0]
    steps = [s for s, _ in scalars(board, "train/step_loss")]
    assert steps == list(range(10, history[-1].global_step + 1, 10))
    assert any("seed seed1 GERMINATED: germinate: val loss plateaued" in t for t in texts(board, "events/seed"))
    assert '"lr": 0.02' in texts(board, "config")[0]


def test_a_resume_hides_what_the_interrupted_segment_wrote_after_its_checkpoint(run_logged: Any,
                                                                               tmp_path: Path) -> None:
    config = logged_config(3, loggers={"tensorboard": {"enabled": True}})
    first = run_logged(config, tmp_path, stop_after=1)  # epochs 0 and 1 logged, a checkpoint after each
    after_epoch_0 = f"ckpt-{first.log.epochs[0].global_step:012d}"
    trainer = run_logged(config, tmp_path, resume=True, checkpoint=after_epoch_0)  # epoch 1 runs again
    board = read_board(tmp_path / "tensorboard")
    assert scalars(board, "train/loss") == [(r.global_step, pytest.approx(r.train_loss)) for r in trainer.log.epochs]


def test_the_deprecated_tensorboard_dir_still_writes_there_and_says_what_replaces_it(run_logged: Any,
                                                                                     tmp_path: Path) -> None:
    board_dir = tmp_path / "old-board"
    config = logged_config(2, exporters={"tensorboard_dir": str(board_dir)})
    with pytest.warns(FutureWarning, match=r"exporters.tensorboard_dir is deprecated: write \[loggers.tensorboard\]"):
        run_logged(config, tmp_path / "run")
    assert len(scalars(read_board(board_dir), "train/loss")) == 2
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_the_deprecated_key_and_the_new_one_must_agree(tmp_path: Path) -> None:
    config = logged_config(2, exporters={"tensorboard_dir": str(tmp_path / "a")},
                           loggers={"tensorboard": {"enabled": True, "dir": str(tmp_path / "b")}})
    with pytest.raises(ValueError, match="disagree: remove exporters.tensorboard_dir"):
        loggers_from_config(config, tmp_path)
