"""`tolaria run/resume/inspect` on real run directories: an existing run is never harmed by a start
that was refused or failed, `--resume`/`--overwrite`/`--from` do what they say, nothing fails silently."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from job_toml import job_toml

from esper.tolaria.checkpoint import corrupt_latest
from esper.tolaria.cli import main

QUIET = ["--quiet", "--no-report"]


def tree(directory: Path) -> dict[str, str]:
    """Every file under `directory` with a digest of its bytes (what 'nothing changed' means)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished 2-epoch run (checkpoints at steps 20 and 40); tests work on copies of it."""
    base = tmp_path_factory.mktemp("finished")
    (base / "job.toml").write_text(job_toml("rundir", epochs=2, seed=1, tamiyo=""))
    assert main(["run", str(base / "job.toml"), "--run-dir", str(base / "run"), *QUIET]) == 0
    return base


@pytest.fixture()
def run(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished / "run", tmp_path / "run")
    shutil.copy(finished / "job.toml", tmp_path / "job.toml")
    return tmp_path / "run"


def bad_build_toml(where: Path) -> Path:
    """Loads as a config, then fails while the job is built (an unknown seed slot)."""
    path = where / "bad.toml"
    path.write_text(job_toml("rundir", epochs=2, seed=1, tamiyo="").replace("hidden = [8]",
                                                                            'hidden = [8]\nslots = ["nope"]'))
    return path


def test_run_refuses_an_existing_run_naming_resume_and_overwrite(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree(run)
    assert main(["run", str(run.parent / "job.toml"), "--run-dir", str(run), *QUIET]) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and "--resume" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert tree(run) == before


def test_a_run_dir_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "job.toml").write_text(job_toml("rundir", epochs=1, seed=1, tamiyo=""))
    (tmp_path / "file").write_text("not a folder")
    assert main(["run", str(tmp_path / "job.toml"), "--run-dir", str(tmp_path / "file"), *QUIET]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "not a folder"


def test_a_failed_overwrite_leaves_the_old_run_exactly_as_it_was(run: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    before = tree(run)
    assert main(["run", str(bad_build_toml(run.parent)), "--run-dir", str(run), "--overwrite", *QUIET]) == 2
    assert "unknown slot 'nope'" in capsys.readouterr().err
    assert tree(run) == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["bad.toml", "job.toml", "run"]  # nothing left aside


def test_overwrite_replaces_the_old_run(run: Path) -> None:
    old_id = json.loads((run / "summary.json").read_text())["run_id"]
    assert main(["run", str(run.parent / "job.toml"), "--run-dir", str(run), "--overwrite", "--epochs", "1",
                 *QUIET]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["run_id"] != old_id and summary["epochs_completed"] == 1
    assert sorted(p.name.split(".")[0] for p in (run / "checkpoints").glob("ckpt-*")) == \
        ["ckpt-000000000000", "ckpt-000000000020"]  # the starting state and epoch 1
    assert old_id not in (run / "telemetry.jsonl").read_text()
    assert sorted(p.name for p in run.parent.iterdir()) == ["job.toml", "run"]


def test_a_failed_resume_does_not_rewrite_the_runs_config(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for model_file in (run / "checkpoints").glob("ckpt-*/model.pt"):  # nothing valid left to resume from
        data = bytearray(model_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model_file.write_bytes(bytes(data))
    config = (run / "config.json").read_bytes()
    assert main(["resume", str(run), "--epochs", "5", *QUIET]) == 2
    assert "no valid committed checkpoint" in capsys.readouterr().err
    assert (run / "config.json").read_bytes() == config


def test_a_failed_build_into_a_new_folder_leaves_nothing_behind(tmp_path: Path) -> None:
    assert main(["run", str(bad_build_toml(tmp_path)), "--run-dir", str(tmp_path / "new"), *QUIET]) == 2
    assert not (tmp_path / "new").exists()


def test_run_resume_continues_the_run_in_place(run: Path) -> None:
    assert main(["run", str(run.parent / "job.toml"), "--run-dir", str(run), "--resume", "--epochs", "3",
                 *QUIET]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 3 and summary["resumed_from"].startswith("ckpt-000000000040")


def test_resume_says_which_checkpoint_it_skipped_and_why(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt_latest(run / "checkpoints")
    assert main(["resume", str(run), *QUIET]) == 0
    err = capsys.readouterr().err
    assert "tolaria resume: skipped ckpt-000000000040/" in err and "mismatch" in err
    assert "fell back to ckpt-000000000020" in err


def test_inspect_of_a_folder_without_a_run_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path)]) != 0
    assert "tolaria inspect: error:" in capsys.readouterr().err


def test_inspect_json_lists_every_checkpoint_in_the_documented_shape(run: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    corrupt_latest(run / "checkpoints")
    assert main(["inspect", str(run), "--json"]) == 1  # one checkpoint does not verify
    listing = json.loads(capsys.readouterr().out)
    assert listing["format"] == "tolaria.inspect/1" and set(listing) == {"format", "directory", "checkpoints", "wal"}
    newest, older, start = listing["checkpoints"]  # newest first; a new run checkpoints its starting state
    keys = {"name", "path", "epoch", "step", "txn", "committed", "verified", "status", "size_bytes", "seeds", "best"}
    assert set(newest) == set(older) == keys and newest["best"] is None  # keep_best is off
    assert (newest["epoch"], newest["step"], newest["committed"], newest["verified"]) == (2, 40, True, False)
    assert newest["status"].startswith("corrupt")
    assert (older["name"], older["epoch"], older["step"], older["verified"], older["status"]) == \
        ("ckpt-000000000020", 1, 20, True, "ok")
    assert (start["name"], start["epoch"], start["step"], start["status"]) == ("ckpt-000000000000", 0, 0, "ok")


def test_resume_from_a_named_checkpoint_branches_into_a_new_run_dir(run: Path) -> None:
    source = tree(run)
    branch = run.parent / "branch"
    assert main(["resume", str(run), "--from", "ckpt-000000000020", "--run-dir", str(branch), *QUIET]) == 0
    summary = json.loads((branch / "summary.json").read_text())
    assert summary["resumed_from"].startswith("ckpt-000000000020") and summary["epochs_completed"] == 2
    assert json.loads((branch / "config.json").read_text()) == json.loads((run / "config.json").read_text())
    assert [p.name.split(".")[0] for p in (branch / "checkpoints").glob("ckpt-*")] == ["ckpt-000000000040"]
    assert tree(run) == source  # the source run is read, never changed


def test_resume_from_accepts_a_checkpoint_path_and_refuses_a_foreign_one(run: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resume", str(run), "--from", str(run.parent / "elsewhere" / "ckpt-000000000020"), *QUIET]) == 2
    assert "--from" in capsys.readouterr().err
    assert main(["resume", str(run), "--from", str(run / "checkpoints" / "ckpt-000000000020"), "--epochs", "3",
                 *QUIET]) == 0
    assert json.loads((run / "summary.json").read_text())["resumed_from"].startswith("ckpt-000000000020")


def test_resume_from_an_unknown_checkpoint_names_the_ones_that_exist(run: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    before = tree(run)
    assert main(["resume", str(run), "--from", "ckpt-000000000030", *QUIET]) == 2
    err = capsys.readouterr().err
    assert "ckpt-000000000030" in err and "ckpt-000000000020" in err
    assert tree(run) == before


def test_a_branch_never_lands_on_a_run_unless_told_and_never_overwrites_its_source(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = run.parent / "other"
    shutil.copytree(run, other)
    before, source = tree(other), tree(run)
    assert main(["resume", str(run), "--from", "ckpt-000000000020", "--run-dir", str(other), *QUIET]) == 2
    assert "--overwrite" in capsys.readouterr().err and tree(other) == before
    assert main(["resume", str(run), "--overwrite", *QUIET]) == 2
    assert "the run being resumed" in capsys.readouterr().err and tree(run) == source
    assert main(["resume", str(run), "--from", "ckpt-000000000020", "--run-dir", str(other), "--overwrite",
                 *QUIET]) == 0
    assert json.loads((other / "summary.json").read_text())["resumed_from"].startswith("ckpt-000000000020")
    assert tree(run) == source
