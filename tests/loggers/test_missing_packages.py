"""A configured logger whose package is missing is one clear error naming the install, raised
before anything is written; the command line prints it without a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from logger_runs import logged_config  # type: ignore[import-not-found]

from esper.tolaria import cli
from esper.tolaria.observe.loggers import MissingLoggerPackage, loggers_from_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("logger", "module", "package"), [
    ("tensorboard", "tensorboard", "tensorboard"), ("mlflow", "mlflow", "mlflow-skinny"), ("wandb", "wandb", "wandb")])
def test_a_missing_package_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, logger: str,
                                                      module: str, package: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what `import <module>` meets when it is not installed
    config = logged_config(2, loggers={logger: {"enabled": True}})
    with pytest.raises(MissingLoggerPackage) as caught:
        loggers_from_config(config, tmp_path / "run")
    message = str(caught.value)
    assert f'pip install "esper-tolaria[{logger}]"' in message and f"pip install {package}" in message
    assert f"loggers.{logger}.enabled" in message
    assert isinstance(caught.value, ValueError), "the command line prints ValueErrors as errors"
    assert not (tmp_path / "run").exists()


def test_the_command_line_prints_the_missing_package_as_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Through `loggers_from_config` as the job calls it: an error line, exit status 2, no traceback."""
    monkeypatch.setitem(sys.modules, "mlflow", None)

    def start(args: object) -> int:
        loggers_from_config(logged_config(2, loggers={"mlflow": {"enabled": True}}), tmp_path)
        return 0

    monkeypatch.setattr(cli, "_cmd_run", start)
    assert cli.main(["run", str(ROOT / "examples" / "digits.toml"), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tolaria run: error: the MLflow logger (loggers.mlflow.enabled) needs mlflow-skinny")
    assert "Traceback" not in err
