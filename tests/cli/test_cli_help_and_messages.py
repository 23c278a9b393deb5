"""The command line explains itself: help text on every argument, errors that name the problem and
the fix instead of a traceback, a warning for a drill that can never fire, and a resume of a
finished run that says so (and how to train further) instead of silently doing nothing."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from job_toml import job_toml

from esper.tolaria import cli
from esper.tolaria.cli import main

QUIET = ["--quiet", "--no-report"]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_argument_of_every_subcommand_has_help_text() -> None:
    parser = cli._parser()
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}"
               for name, sub in {"tolaria": parser, **subcommands(parser)}.items() for a in sub._actions
               if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
               and (not a.help or a.help == argparse.SUPPRESS)]
    assert missing == []


def test_inject_help_names_every_part_of_a_drill_spec(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "KIND@epoch=N[,step=M][,rank=R]" in out and "on torchrun rank R only" in out
    assert "counted from 0" in out


def test_bench_only_help_lists_the_figures_and_an_unknown_figure_is_an_error_listing_them(
        capsys: pytest.CaptureFixture[str]) -> None:
    from esper.tolaria.bench import registry

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = "".join(capsys.readouterr().out.split())  # help wraps anywhere: compare without whitespace
    assert registry.FIGURES, "bench --help imported the figure modules"
    for name in registry.FIGURES:
        assert name in out, name
    assert "with--devicecuda:" in out
    assert main(["bench", "--only", "no_such_figure", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tolaria bench: error: unknown bench figure(s) no_such_figure; known: ")
    assert all(name in err for name in registry.FIGURES)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run and its config; tests work on copies."""
    base = tmp_path_factory.mktemp("finished")
    (base / "job.toml").write_text(job_toml("msgs", epochs=2, seed=3, tamiyo=""))
    assert main(["run", str(base / "job.toml"), "--run-dir", str(base / "run"), *QUIET]) == 0
    return base


@pytest.fixture()
def run(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished / "run", tmp_path / "run")
    return tmp_path / "run"


def tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resume_into_a_run_dir_that_is_a_file_is_a_clear_error(run: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main(["resume", str(run), "--from", "ckpt-000000000020", "--run-dir", str(target), *QUIET]) == 2
    err = capsys.readouterr().err
    assert f"--run-dir {target} is a file, not a directory" in err and "Traceback" not in err
    assert target.read_text() == "mine"


def test_resuming_a_finished_run_says_so_and_how_to_train_further(run: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    before = tree(run)
    assert main(["resume", str(run), *QUIET]) == 0
    out = capsys.readouterr().out
    assert f"{run} has already trained all 2 of its epochs" in out and "nothing to train" in out
    assert f"to train further: tolaria resume {run} --epochs N" in out
    assert tree(run) == before, "nothing was trained or rewritten"
    assert main(["resume", str(run), "--epochs", "1", *QUIET]) == 0
    assert "has already trained 2 epochs, more than the 1 asked" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["resume", str(run), "--epochs", "0", *QUIET])
    assert "argument --epochs: 0: train at least 1 epoch in total" in capsys.readouterr().err
    assert tree(run) == before
    assert main(["resume", str(run), "--epochs", "3", *QUIET]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 3


def test_a_run_killed_after_its_last_checkpoint_but_before_its_summary_resumes_to_write_it(run: Path) -> None:
    (run / "summary.json").unlink()  # SIGKILL between the last checkpoint's commit and the summary
    assert main(["resume", str(run), *QUIET]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 2


def test_run_resume_of_a_finished_run_says_so_too(finished: Path, run: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    before = tree(run)
    assert main(["run", str(finished / "job.toml"), "--run-dir", str(run), "--resume", *QUIET]) == 0
    out = capsys.readouterr().out
    assert "has already trained all 2 of its epochs" in out and "--resume --epochs N" in out
    assert tree(run) == before


def test_a_resume_from_an_earlier_checkpoint_of_a_finished_run_still_trains(run: Path, tmp_path: Path) -> None:
    assert main(["resume", str(run), "--from", "ckpt-000000000020", "--run-dir", str(tmp_path / "b"), *QUIET]) == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["epochs_completed"] == 2


def test_a_drill_after_the_last_epoch_is_a_warning_before_the_run_starts(
        finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import esper.tolaria.job as job

    seen: list[str] = []

    def not_run(*_args: Any, **_kwargs: Any) -> dict[str, Any]:
        seen.append(capsys.readouterr().err)  # what was said before the job was handed over
        raise ValueError("stopped by the test")

    monkeypatch.setattr(job, "run_job", not_run)
    argv = ["run", str(finished / "job.toml"), "--run-dir", str(tmp_path / "r"), *QUIET,
            "--inject", "disk-full@epoch=2", "--inject", "nan-loss@epoch=1,step=3", "--inject", "lr-tamper@epoch=9"]
    assert main(argv) == 2
    assert seen == [
        "tolaria run: warning: drill disk-full@epoch=2 never fires: the run's last epoch is 1 (epochs count from 0; "
        "this run trains 2); schedule it at an epoch below 2 or raise --epochs\n"
        "tolaria run: warning: drill lr-tamper@epoch=9 never fires: the run's last epoch is 1 (epochs count from 0; "
        "this run trains 2); schedule it at an epoch below 2 or raise --epochs\n"]


@pytest.mark.parametrize("command", ["run", "resume", "report"])
def test_an_output_folder_below_a_file_is_a_clear_error_not_a_traceback(
        command: str, finished: Path, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    target = blocker / "out"
    argv = {"run": ["run", str(finished / "job.toml"), "--run-dir", str(target), *QUIET],
            "resume": ["resume", str(run), "--from", "ckpt-000000000020", "--run-dir", str(target), *QUIET],
            "report": ["report", str(run), str(run), "--out", str(target)]}[command]
    assert main(argv) == 2
    flag = "--out" if command == "report" else "--run-dir"
    assert capsys.readouterr().err == (f"tolaria {command}: error: {flag} {target} is inside {blocker}, which is a "
                                       "file, not a directory: pass a folder path\n")
    assert blocker.read_text() == "mine"
