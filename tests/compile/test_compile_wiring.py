"""`run.compile` wired into the trainer: the host trains compiled, every seed structure change
(germination, a stage change, a rollback's or resume's rebuilt seeds) drops the graphs exactly
once, and a compiled run ends where the eager run of the same job ends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from trainer_fixtures import StopAfter, small_config  # type: ignore[import-not-found]

from esper.tolaria.loop.build import build_trainer

COMPILED = {"compile": True, "compile_backend": "aot_eager"}  # traced, no C++ compiler needed


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    saved = torch._dynamo.config.skip_nnmodule_hook_guards
    torch.compiler.reset()
    yield
    torch._dynamo.config.skip_nnmodule_hook_guards = saved
    torch.compiler.reset()


def _boundaries_that_changed_seeds(summary: dict[str, Any]) -> int:
    """How many boundaries changed some seed's stage: each must have dropped the graphs once."""
    return len({h["epoch"] for seed in summary["seeds"].values() for h in seed["stage_history"]})


def test_a_compiled_run_grows_drops_its_graphs_once_per_change_and_matches_eager() -> None:
    eager = build_trainer(small_config(run={"epochs": 5})).fit().summary
    trainer = build_trainer(small_config(run={"epochs": 5, **COMPILED}))
    names = list(trainer.model.state_dict())
    summary = trainer.fit().summary
    assert trainer.model._compiled_call_impl is not None
    assert summary["seeds"], "the job should grow a seed for the structure path to be exercised"
    resets = summary["compile"]["structure_resets"]
    assert summary["compile"]["backend"] == "aot_eager"
    assert resets >= 1, "a germination must drop the graphs compiled without the seed"
    assert resets == _boundaries_that_changed_seeds(summary)
    assert all(not n.startswith("_orig_mod.") for n in trainer.model.state_dict())
    assert set(names) <= set(trainer.model.state_dict())
    assert summary["final_val_accuracy"] == pytest.approx(eager["final_val_accuracy"], abs=0.02)


def test_an_eager_run_reports_no_compile() -> None:
    assert build_trainer(small_config(run={"epochs": 1})).fit().summary["compile"] is None


def test_a_resumed_compiled_run_drops_the_graphs_of_the_rebuilt_seeds_and_ends_where_the_whole_run_does(
        tmp_path: Path) -> None:
    config = small_config(run={"epochs": 5, **COMPILED}, checkpoint={"enabled": True})
    whole = build_trainer(config, run_dir=tmp_path / "whole").fit().summary
    cut = build_trainer(config, run_dir=tmp_path / "cut", callbacks=[StopAfter(2)]).fit().summary
    assert cut["epochs_completed"] == 3 and cut["seeds"]
    resumed = build_trainer(config, run_dir=tmp_path / "cut")
    resumed.resume_from(tmp_path / "cut" / "checkpoints")
    summary = resumed.fit().summary
    assert summary["compile"]["structure_resets"] >= 1  # the seeds the resume rebuilt, at the latest
    assert summary["final_state_sha256"] == whole["final_state_sha256"]
