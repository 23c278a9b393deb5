"""`checkpoint.keep_best` through the CLI: a real run keeps its best checkpoint long after retention
of the last N would have deleted it, `tolaria inspect` says which it is, and `tolaria resume --from
best` continues from it exactly as `--from <its name>` does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from job_toml import job_toml

from esper.tolaria.cli import main

QUIET = ["--quiet", "--no-report"]
EPOCHS = 5
# The validation loss watched as if higher were better: the best epoch is an early one, so the last
# checkpoint (keep_last = 1) is never it and retention would delete it.
KEEP_BEST = 'keep_last = 1\nkeep_best = {top_k = 1, metric = "loss", mode = "max"}'


def summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("keep_best")
    toml = job_toml("best", epochs=EPOCHS, seed=2, tamiyo="").replace("keep_last = 3", KEEP_BEST)
    (base / "job.toml").write_text(toml)
    assert main(["run", str(base / "job.toml"), "--run-dir", str(base / "run"), *QUIET]) == 0
    return base / "run"


def best_epoch(run: Path) -> int:
    history = summary(run)["history"]
    losses = [h["val_loss"] for h in history]
    return int(history[losses.index(max(losses))]["epoch"])


def test_the_best_checkpoint_is_kept_through_retention_and_inspect_names_it(
        kept: Path, capsys: pytest.CaptureFixture[str]) -> None:
    epoch = best_epoch(kept)
    assert epoch < EPOCHS - 2, "the test needs a best epoch that retention of the last 1 would delete"
    assert main(["inspect", str(kept), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    best = [c for c in listed if c["best"] is not None]
    assert len(listed) == 2 and len(best) == 1, [c["name"] for c in listed]
    assert best[0]["best"]["epoch"] == epoch and best[0]["best"]["rank"] == 1
    assert best[0]["epoch"] == epoch + 1, "a boundary checkpoint resumes at the next epoch"
    assert best[0]["best"]["value"] == max(h["val_loss"] for h in summary(kept)["history"])
    assert summary(kept)["safety"]["best_checkpoints"][0]["name"] == best[0]["name"]
    assert main(["inspect", str(kept)]) == 0
    table = capsys.readouterr().out
    assert f"best 1: loss {best[0]['best']['value']:.4f}" in table


def test_the_run_ends_by_naming_its_best_checkpoint(kept: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from esper.tolaria.cli import _print_result

    _print_result(summary(kept), kept)
    best = summary(kept)["safety"]["best_checkpoints"][0]
    line = capsys.readouterr().out.splitlines()[-1]
    assert line == (f"best checkpoint: {best['name']} (loss {best['best']['value']:.4f} at epoch "
                    f"{best_epoch(kept)}); continue from it: tolaria resume {kept} --from best")


def test_resume_from_best_continues_exactly_as_resume_from_its_name(kept: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(kept, run)
    name = next(c["name"] for c in summary(run)["safety"]["best_checkpoints"])
    assert main(["resume", str(run), "--from", "best", "--run-dir", str(tmp_path / "by_best"), *QUIET]) == 0
    assert main(["resume", str(run), "--from", name, "--run-dir", str(tmp_path / "by_name"), *QUIET]) == 0
    by_best, by_name = summary(tmp_path / "by_best"), summary(tmp_path / "by_name")
    assert by_best["resumed_from"] == by_name["resumed_from"] == name
    assert by_best["final_state_sha256"] == by_name["final_state_sha256"]
    assert [h["val_loss"] for h in by_best["history"]] == [h["val_loss"] for h in by_name["history"]]
    assert by_best["epochs_completed"] == EPOCHS


def test_resume_from_best_without_a_kept_best_is_a_clear_error(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "job.toml").write_text(job_toml("nobest", epochs=1, seed=1, tamiyo=""))
    assert main(["run", str(tmp_path / "job.toml"), "--run-dir", str(tmp_path / "run"), *QUIET]) == 0
    assert main(["resume", str(tmp_path / "run"), "--from", "best", "--epochs", "2", *QUIET]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tolaria resume: error: --from best: no checkpoint in ") and "keep_best" in err
    assert "Traceback" not in err


def test_only_boundary_checkpoints_are_scored_and_an_unknown_direction_is_refused_before_training() -> None:
    from types import SimpleNamespace

    from esper.tolaria.config import KeepBestConfig
    from esper.tolaria.loop.keep_best import BestScorer
    from esper.tolaria.tasks import ClassificationTask

    log = SimpleNamespace(epochs=[SimpleNamespace(epoch=0, val_metrics={"accuracy": 0.5}, val_loss=1.0)])
    scorer = BestScorer(KeepBestConfig(top_k=2), ClassificationTask(), log)  # type: ignore[arg-type]
    assert scorer(1) is not None and (scorer(1).metric, scorer(1).mode, scorer(1).value) == ("accuracy", "max", 0.5)
    assert scorer(0) is None and scorer(2) is None, "the starting state and a mid-epoch stop carry no score"
    log.epochs[0].val_metrics["accuracy"] = float("nan")
    assert scorer(1) is None, "a non-finite value is never best"
    with pytest.raises(ValueError, match="set checkpoint.keep_best.mode to 'max' or 'min'"):
        BestScorer(KeepBestConfig(top_k=1, metric="token_accuracy"), ClassificationTask(), log)  # type: ignore[arg-type]
