"""Config files: YAML beside TOML (by extension), every error at once with a "did you mean", and the
source of each bad value (the file or the command line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.tolaria.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]

TOML = """
[run]
name = "same"
epochs = 7

[data]
batch_size = 16

[kasmina]
blend_steps = 12

[model.kwargs]
hidden = [8, 4]
"""

YAML = """
run:
  name: same
  epochs: 7
data:
  batch_size: 16
kasmina:
  blend_steps: 12
model:
  kwargs:
    hidden: [8, 4]
"""


def test_yaml_and_toml_give_the_same_config(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(TOML)
    (tmp_path / "a.yaml").write_text(YAML)
    (tmp_path / "a.yml").write_text(YAML)
    toml = load_config(tmp_path / "a.toml")
    assert toml.run.epochs == 7 and toml.model.kwargs == {"hidden": [8, 4]}
    assert load_config(tmp_path / "a.yaml") == toml == load_config(tmp_path / "a.yml")
    assert load_config(tmp_path / "a.yaml").sha256() == toml.sha256()


def test_the_shipped_example_reads_the_same_as_yaml(tmp_path: Path) -> None:
    import tomllib

    import yaml

    data = tomllib.loads((ROOT / "examples" / "digits.toml").read_text())
    (tmp_path / "digits.yaml").write_text(yaml.safe_dump(data))
    assert load_config(tmp_path / "digits.yaml") == load_config(ROOT / "examples" / "digits.toml")


def test_bad_yaml_and_a_yaml_list_are_named(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("run: [epochs: 3\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- run\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "yaml.cfg").write_text(YAML)
    with pytest.raises(ConfigError, match="needs the .yaml or .yml extension"):
        load_config(tmp_path / "yaml.cfg")


def test_every_bad_key_in_every_section_is_reported_at_once_with_a_suggestion(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[run]\nepohcs = 3\n\n[data]\nbatch_size = 0\n\n[kasmina]\nblend_stesp = 4\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "bad.toml")
    message = str(caught.value)
    assert "run.epohcs: unknown key" in message and "did you mean 'epochs'?" in message
    assert "data.batch_size:" in message
    assert "kasmina.blend_stesp: unknown key" in message and "did you mean 'blend_steps'?" in message


def test_each_bad_value_names_where_it_came_from(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("[data]\nbatch_size = 0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "a.toml", {"run": {"epochs": 0}})
    lines = {line.split(":")[0].strip(): line for line in str(caught.value).splitlines()[1:]}
    assert "[from the command line" in lines["run.epochs"], "an --epochs 0 is not blamed on the file"
    assert f"[from {tmp_path / 'a.toml'}]" in lines["data.batch_size"]
