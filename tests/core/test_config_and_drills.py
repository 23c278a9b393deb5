"""Bad config and bad drill specs fail with errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.tolaria.config import ConfigError, config_from_dict, load_config
from esper.tolaria.drills import DrillError, FaultPlan, parse_drill

ROOT = Path(__file__).resolve().parents[2]


def test_the_bundled_digits_config_loads() -> None:
    config = load_config(ROOT / "examples" / "digits.toml")
    assert config.data.dataset == "digits" and config.run.epochs > 0


def test_unknown_keys_are_errors_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[run]\nepochs = 3\nepohcs = 4\n")
    with pytest.raises(ConfigError, match=r"run\.epohcs: unknown key; remove it or check the spelling"):
        load_config(path)


def test_unknown_key_errors_list_the_valid_keys_of_their_section() -> None:
    with pytest.raises(ConfigError, match=r"run\.epohcs: .*valid keys here: name, epochs, seed") as info:
        config_from_dict({"run": {"epohcs": 4}})
    assert "config --help" not in str(info.value)  # no such command exists
    with pytest.raises(ConfigError, match=r"kasmina\.blend_stepz: .*valid keys here: .*blend_steps"):
        config_from_dict({"kasmina": {"blend_stepz": 3}})


def test_bad_values_name_the_key_and_the_value() -> None:
    with pytest.raises(ConfigError, match=r"optimizer\.lr: Input should be greater than 0 \(got -1\)"):
        config_from_dict({"optimizer": {"lr": -1}})
    # The safety knobs added with copy-behind, the gradient-check cadence and the rollback cap.
    with pytest.raises(ConfigError, match=r"emergency\.grad_check_every: Input should be greater than or equal to 1"):
        config_from_dict({"emergency": {"grad_check_every": 0}})
    with pytest.raises(ConfigError, match=r"emergency\.max_rollbacks_without_progress: Input should be greater"):
        config_from_dict({"emergency": {"max_rollbacks_without_progress": 0}})
    with pytest.raises(ConfigError, match=r"snapshots\.copy_behind: Input should be a valid boolean"):
        config_from_dict({"snapshots": {"copy_behind": "sometimes"}})


def test_component_sections_are_validated_at_load() -> None:
    with pytest.raises(ConfigError, match=r"kasmina\.blend_stepz: unknown key"):
        config_from_dict({"kasmina": {"blend_stepz": 3}})


def test_missing_file_and_bad_toml_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "x.toml").write_text("[run\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(tmp_path / "x.toml")


def test_drill_specs_parse_and_bad_ones_name_the_problem() -> None:
    drill = parse_drill("lr-tamper@epoch=2,step=40")
    assert (drill.kind, drill.epoch, drill.step) == ("lr-tamper", 2, 40)
    with pytest.raises(DrillError, match="unknown drill 'tamiyo-dance'"):
        parse_drill("tamiyo-dance@epoch=1")
    with pytest.raises(DrillError, match="expected KIND@epoch=N"):
        parse_drill("tamiyo-hang")


def test_a_drill_fires_once_at_its_epoch() -> None:
    plan = FaultPlan.parse(["tamiyo-raise@epoch=3"])
    assert plan.due("tamiyo-raise", 2) is None
    assert plan.due("tamiyo-raise", 3) is not None
    assert plan.due("tamiyo-raise", 3) is None
