"""steps.csv: a header row, written once however many times the run resumes; old files still read."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from esper.tolaria.observe.steplog import StepLog, read_step_log


def write_steps(path: Path, losses: dict[int, float | None]) -> None:
    log = StepLog(path)
    for step, loss in losses.items():
        log.on_step_end(None, step + 1, None if loss is None else torch.tensor(loss))  # the hook passes the count
    log.flush()


def test_steps_csv_starts_with_a_header_and_a_resume_adds_no_second_one(tmp_path: Path) -> None:
    path = tmp_path / "steps.csv"
    write_steps(path, {0: 0.5, 1: None})
    write_steps(path, {1: 0.25, 2: 0.125})  # a resumed process re-runs step 1
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["global_step", "loss"], ["0", "0.5"], ["1", "skipped"], ["1", "0.25"], ["2", "0.125"]]
    assert read_step_log(path) == {0: "0.5", 1: "0.25", 2: "0.125"}


def test_a_steps_csv_written_before_the_header_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "steps.csv"
    path.write_text("0,0.5\n1,0.25\n")
    assert read_step_log(path) == {0: "0.5", 1: "0.25"}
