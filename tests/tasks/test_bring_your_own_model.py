"""`tolaria run` on a user's model and data named by import path from a module outside the
package (the README's "Bring your own model" example, kept identical to the files it shows)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from esper.tolaria.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "byo"


def test_the_readme_shows_the_example_files_as_they_are() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Bring your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:python|toml)\n(.*?)```", section, flags=re.S)
    assert (EXAMPLE / "mymodel.py").read_text() in blocks
    assert (EXAMPLE / "mymodel.toml").read_text() in blocks


def test_the_example_trains_grows_and_resumes_from_another_directory(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the module is found next to the config, not in the cwd
    run = tmp_path / "run"
    args = ["run", str(EXAMPLE / "mymodel.toml"), "--run-dir", str(run), "--quiet", "--no-report"]
    assert main([*args, "--epochs", "11"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 11 and summary["task"]["name"] == "classification"
    assert summary["final_val_accuracy"] > 0.7
    assert summary["seeds"], "Tamiyo germinated a seed in the user's model"
    assert main(["resume", str(run), "--epochs", "13", "--quiet", "--no-report"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 13


@pytest.mark.parametrize(("key", "value", "named"), [
    ("model.factory", "mymodel:no_such_function", "no_such_function"),
    ("model.factory", "no_such_module:build", "no_such_module"),
    ("data.factory", "mymodel:Net", "missing required keyword"),
    ("task", "mymodel:build_model", "build_model"),
    ("task", "ranking", "ranking"),
])
def test_a_bad_import_path_is_one_clear_error_and_writes_nothing(tmp_path: Path, key: str, value: str, named: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    code = main(["run", str(EXAMPLE / "mymodel.toml"), "--run-dir", str(run), "--quiet", "--no-report",
                 "--set", f"{key}={value}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert key in err and named in err, err
    assert not run.exists(), "nothing is half-written"
