"""`tolaria run CONFIG --set key.path=value --name NAME --seed N`: values typed by the config schema,
merged table by table into the TOML, and every bad override refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from esper.tolaria.cli import _parser, _run_overrides, main
from esper.tolaria.config import ConfigError, load_config, merge_overrides, parse_set_item, parse_set_overrides

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.toml"
QUIET = ["--quiet", "--no-report"]


def _value(item: str) -> Any:
    """The value `--set item` puts at its key."""
    nested: Any = parse_set_item(item)
    for part in item.partition("=")[0].split("."):
        nested = nested[part]
    return nested


def _error(item: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_set_item(item)
    return str(info.value)


# ---------------------------------------------------------------- the parser


@pytest.mark.parametrize(("item", "expected"), [
    ("optimizer.lr=0.01", 0.01),
    ("optimizer.lr=1e-3", 0.001),
    ("run.epochs=3", 3),
    ("run.deterministic=false", False),
    ("run.precision=bf16", "bf16"),
    ("run.device=cuda:1", "cuda:1"),
    ("run.name=123", "123"),           # a string field keeps digits as text
    ('run.name="my run"', "my run"),   # a quoted TOML string
    ("task=regression", "regression"),
    ("task=mypkg.tasks:MyTask", "mypkg.tasks:MyTask"),
    ("model.hidden=[32,16]", [32, 16]),
    ('model.slots=["stem", "body.1"]', ["stem", "body.1"]),
    ("data.factory=mydata:build", "mydata:build"),
    ("optimizer.accumulate_steps=4", 4),
])
def test_values_are_typed_by_the_schema(item: str, expected: Any) -> None:
    value = _value(item)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("item", "expected"), [
    ("model.kwargs.width=64", 64),
    ("model.kwargs.activation=relu", "relu"),  # not TOML: a string
    ("model.kwargs.sizes=[1, 2]", [1, 2]),
    ("model.kwargs.block.depth=2", 2),         # nested tables inside a free-form one
    ("data.kwargs.root=/data/x", "/data/x"),
    ("task_options.target_key=label", "label"),
    ("kasmina.blend_steps=10", 10),
    ("tamiyo.plateau_window=3", 3),
])
def test_free_form_tables_take_toml_values_or_bare_strings(item: str, expected: Any) -> None:
    assert _value(item) == expected


def test_a_whole_free_form_table_is_an_inline_table() -> None:
    assert parse_set_item('model.kwargs={width = 64, act = "relu"}') == {
        "model": {"kwargs": {"width": 64, "act": "relu"}}}


def test_items_merge_into_one_nested_dict_and_later_ones_win() -> None:
    overrides = parse_set_overrides(["model.kwargs.width=64", "model.kwargs.depth=2", "run.epochs=3",
                                     "run.epochs=5", "task=regression"])
    assert overrides == {"model": {"kwargs": {"width": 64, "depth": 2}}, "run": {"epochs": 5}, "task": "regression"}


@pytest.mark.parametrize(("item", "expected"), [
    ("run.epochs=three", "--set run.epochs=three: run.epochs expects an integer (got 'three')"),
    ("optimizer.lr=fast", "--set optimizer.lr=fast: optimizer.lr expects a number (got 'fast')"),
    ("run.deterministic=maybe", "run.deterministic expects true or false (got 'maybe')"),
    ("run.precision=fp64", "run.precision expects one of fp32, bf16, fp16 (got 'fp64')"),
    ("model.hidden=32", "model.hidden expects a list of integers (TOML, e.g. [32, 16]) (got '32')"),
    ("model.kwargs=3", "model.kwargs expects a table (TOML, e.g. {width = 64}) (got '3')"),
    ("lr.total_steps=many", "lr.total_steps expects an integer (got 'many')"),
])
def test_a_type_error_names_the_key_the_value_and_the_expected_type(item: str, expected: str) -> None:
    assert expected in _error(item)


def test_an_unknown_key_is_named_with_the_valid_keys_at_its_level() -> None:
    nested = _error("run.epcohs=3")
    assert "unknown key 'run.epcohs' (did you mean 'epochs'?)" in nested
    assert "valid keys in [run]: name, epochs, seed" in nested
    top = _error("epochs=3")
    assert "unknown key 'epochs' (did you mean run.epochs?)" in top
    assert "valid keys at the top level: task, task_options, run, data, model" in top


def test_a_missing_equals_sign_or_empty_key_part_is_named() -> None:
    assert _error("run.epochs") == "--set run.epochs: expected KEY=VALUE (no '=' found), e.g. --set run.epochs=3"
    assert "is not a dotted key" in _error("run..epochs=3")
    assert "is not a dotted key" in _error("=3")


def test_a_section_is_not_a_value_and_a_value_is_not_a_section() -> None:
    assert "run is a section, not a value; set one of its keys" in _error("run=3")
    assert "run.epochs is a value, not a section; use --set run.epochs=VALUE" in _error("run.epochs.x=3")


# ---------------------------------------------------------------- merging into the file


def test_merge_overrides_is_deep_and_replaces_non_tables() -> None:
    base = {"model": {"hidden": [6], "kwargs": {"width": 8, "depth": 2}}, "task": "classification"}
    merge_overrides(base, {"model": {"hidden": [32, 16], "kwargs": {"width": 64}}, "task": "regression"})
    assert base == {"model": {"hidden": [32, 16], "kwargs": {"width": 64, "depth": 2}}, "task": "regression"}


def test_load_config_keeps_the_files_other_keywords_and_sets_top_level_keys(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('task = "classification"\n[model]\nfactory = "m:build"\nkwargs = {width = 8, depth = 2}\n'
                    "[kasmina]\nblend_steps = 60\nseed_hidden = 4\n")
    overrides = parse_set_overrides(["model.kwargs.width=64", "task=regression", "kasmina.blend_steps=10"])
    config = load_config(path, overrides)
    assert config.model.kwargs == {"width": 64, "depth": 2}
    assert config.task == "regression"
    assert config.kasmina == {"blend_steps": 10, "seed_hidden": 4}


def test_named_flags_go_through_the_same_merge_and_win_over_set() -> None:
    args = _parser().parse_args(["run", str(DIGITS), "--set", "run.epochs=5", "--set", "run.seed=1",
                                 "--epochs", "2", "--name", "trial", "--seed", "9", "--no-morphogenesis",
                                 "--set", "model.kwargs.width=4"])
    assert _run_overrides(args) == {"run": {"epochs": 2, "seed": 9, "name": "trial", "morphogenesis": False},
                                    "model": {"kwargs": {"width": 4}}}


# ---------------------------------------------------------------- through `tolaria run`


@pytest.mark.parametrize(("argv", "expected"), [
    (["--set", "run.epochs=three"], "--set run.epochs=three: run.epochs expects an integer (got 'three')"),
    (["--set", "run.epcohs=3"], "unknown key 'run.epcohs'"),
    (["--set", "run.epochs"], "expected KEY=VALUE"),
    (["--set", "run.epochs=0"], "run.epochs: Input should be greater than or equal to 1 (got 0)"),
    (["--seed", "-1"], "run.seed: Input should be greater than or equal to 0 (got -1)"),
    (["--set", "kasmina.blend_stps=4"], "kasmina.blend_stps: unknown key"),
    (["--set", "run.device=gpu"], "run.device: String should match pattern"),
])
def test_a_bad_override_is_one_error_line_and_writes_nothing(
        argv: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    assert main(["run", str(DIGITS), "--run-dir", str(run_dir), *QUIET, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tolaria run: error: ") and expected in err and "Traceback" not in err
    assert not run_dir.exists()


def test_a_tiny_run_records_the_overrides_in_its_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = ["run", str(DIGITS), "--run-dir", str(run_dir), *QUIET, "--set", "run.epochs=1", "--name", "tiny",
            "--seed", "7", "--set", "optimizer.lr=0.02", "--set", "kasmina.blend_steps=10"]
    assert main(argv) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run"]["epochs"] == 1 and config["run"]["name"] == "tiny" and config["run"]["seed"] == 7
    assert config["optimizer"]["lr"] == 0.02
    assert config["kasmina"] == {"blend_steps": 10}
    assert config["tamiyo"]["plateau_window"] == 2  # the file's other values stay
