"""`tolaria study`: three arms per seed on one split and budget, the JSON, and its report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from esper.kasmina import KasminaLayer
from esper.kasmina.birth import build_at_birth, read_manifest
from esper.leyline import SEED_OP_GERMINATE, seed_command
from esper.tolaria.cli import main
from esper.tolaria.study import parse_seeds, run_study

TINY = """
[run]
name = "tiny-study"
epochs = 3
threads = 1

[data]
dataset = "digits"
batch_size = 64

[model]
hidden = [8]

[optimizer]
lr = 0.02

[checkpoint]
enabled = false

[telemetry]
jsonl = false

[kasmina]
min_training_steps = 5
blend_steps = 10
seed_hidden = 16

[tamiyo]
plateau_window = 1
plateau_threshold = 1.0
cooldown_epochs = 0
min_training_epochs = 1
"""

ARM_KEYS = {"run_dir", "final", "final_loss", "best", "best_epoch", "params", "params_at_first_epoch", "flops",
            "flops_per_step", "epochs", "curve", "events"}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    base = tmp_path_factory.mktemp("study")
    config = base / "tiny.toml"
    config.write_text(TINY)
    out = base / "study.json"
    assert main(["study", str(config), "--seeds", "0-1", "--json", str(out), "--run-root", str(base / "runs"),
                 "--set", "run.name=tiny-set"]) == 0
    return base, json.loads(out.read_text())


def test_a_tiny_study_runs_three_arms_per_seed_and_writes_every_key(study: tuple[Path, dict[str, Any]]) -> None:
    base, data = study
    assert data["format"] == "tolaria.study/1" and data["metric"] == "accuracy" and data["higher_is_better"]
    assert [r["seed"] for r in data["seeds"]] == [0, 1]
    for row in data["seeds"]:
        assert row["grew"] is True
        assert set(row) == {"seed", "arms", "grew", "grown_flops_to_static_final", "grown_flops_ratio",
                            "grown_flops_to_static_final_loss", "grown_flops_ratio_loss", "grown_minus_host",
                            "grown_minus_static"}
        assert set(row["arms"]) == {"host", "grown", "static"}
        for arm, figures in row["arms"].items():
            assert set(figures) == ARM_KEYS, arm
            assert figures["epochs"] == 3 and figures["flops"] > 0 and 0 < figures["final"] <= 1
            summary = json.loads((Path(figures["run_dir"]) / "summary.json").read_text())
            assert summary["morphogenesis"] is (arm == "grown")
            assert summary["experiment"] == "tiny-set"  # --set reaches every arm
            assert summary["flops"]["total"] == figures["flops"] == figures["curve"][-1]["flops"]
    assert set(data["median"]) >= {"host", "grown", "static", "grown_flops_to_static_final", "grown_flops_ratio",
                                   "reached", "grew", "grown_minus_host", "grown_minus_static"}
    assert set(data["goals"]) == {"thresholds", "flops_ratio", "within_static", "over_host"}


def test_the_static_arm_starts_with_the_grown_runs_final_parameter_count(study: tuple[Path, dict[str, Any]]) -> None:
    _, data = study
    for row in data["seeds"]:
        host, grown, static = (row["arms"][a] for a in ("host", "grown", "static"))
        assert grown["events"] and grown["events"][0]["stage"] == "GERMINATED"
        assert grown["params"] > host["params"]
        assert static["params_at_first_epoch"] == static["params"] == grown["params"]
        assert static["events"] == []  # nothing grows in the static arm: it was born grown
        summary = json.loads((Path(static["run_dir"]) / "summary.json").read_text())
        assert summary["seeds"] == {}
        # the same structure trains every step from the start, so it costs at least the host per step
        assert static["flops_per_step"] > host["flops_per_step"]


def test_a_ratio_is_the_grown_flops_to_the_static_final_over_the_static_total(
        study: tuple[Path, dict[str, Any]]) -> None:
    _, data = study
    for row in data["seeds"]:
        grown, static = row["arms"]["grown"], row["arms"]["static"]
        first = next((c for c in grown["curve"] if c["metric"] >= static["final"]), None)
        assert row["grown_flops_to_static_final"] == (first["flops"] if first else None)
        if first is not None:
            assert row["grown_flops_ratio"] == pytest.approx(first["flops"] / static["flops"])
        by_loss = next((c for c in grown["curve"] if c["loss"] <= static["final_loss"]), None)
        assert row["grown_flops_to_static_final_loss"] == (by_loss["flops"] if by_loss else None)


def test_report_on_a_study_json_draws_metric_against_flops(study: tuple[Path, dict[str, Any]]) -> None:
    base, _ = study
    assert main(["report", str(base / "study.json"), "--out", str(base / "page")]) == 0
    page = (base / "page" / "index.html").read_text()
    assert "Does growth pay?" in page and "grown FLOPs to static final" in page
    assert (base / "page" / "metric_vs_flops.png").stat().st_size > 1000


def test_report_refuses_a_json_that_is_not_a_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.json"
    other.write_text("{}")
    assert main(["report", str(other)]) == 2
    assert "is not a study" in capsys.readouterr().err


def test_the_json_is_written_after_every_seed_so_an_interrupted_study_keeps_its_seeds(tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "study.json"
    seen: list[list[int]] = []

    def say(line: str) -> None:
        if line.startswith("study: seed 1, host"):
            seen.append([r["seed"] for r in json.loads(out.read_text())["seeds"]])

    study = run_study(config, [0, 1], run_root=tmp_path / "runs", out=out, epochs=1, say=say)
    assert seen == [[0]]  # seed 0 was on disk before seed 1 began
    assert json.loads(out.read_text()) == study and study["seeds_requested"] == [0, 1]


WIDENING = (TINY.replace("hidden = [8]", "hidden = [16, 8]")
            .replace("seed_hidden = 16", 'seed_hidden = 16\nwiden = [["body.2", "head"]]\nwiden_units = 4')
            .replace("min_training_epochs = 1", 'min_training_epochs = 1\ngrowth = "widen"\nwiden_layers = ["body.2"]')
            + "\n[boundary]\ntotal_ms = 100000.0\napply_ms = 10000.0\ncheck_ms = 10000.0\n"
            + "state_assembly_ms = 10000.0\ntamiyo_ms = 10000.0\n")


def test_a_grown_run_that_widened_a_layer_has_a_static_arm_born_that_wide(tmp_path: Path) -> None:
    config = tmp_path / "widen.toml"
    config.write_text(WIDENING)
    study = run_study(config, [0], run_root=tmp_path / "runs", epochs=3, say=lambda _: None)
    grown, static = study["seeds"][0]["arms"]["grown"], study["seeds"][0]["arms"]["static"]
    assert any(c["params"] > grown["curve"][0]["params"] for c in grown["curve"])  # it widened
    assert static["params_at_first_epoch"] == static["params"] == grown["params"]
    summary = json.loads((Path(static["run_dir"]) / "summary.json").read_text())
    assert summary["final_manifest"]["widenings"] and summary["final_manifest"]["widenings"] == json.loads(
        (Path(grown["run_dir"]) / "summary.json").read_text())["final_manifest"]["widenings"]


def test_seeds_parse_ranges_and_lists_and_refuse_the_rest() -> None:
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,2,5") == [0, 2, 5]
    assert parse_seeds("3") == [3]
    assert parse_seeds("0-2,1,7") == [0, 1, 2, 7]
    for bad in ("4-0", "a", "1-", ""):
        with pytest.raises(ValueError, match="expected seeds like 0-4"):
            parse_seeds(bad)


# ---------------------------------------------------------------- building a manifest at birth

def grown_layer() -> tuple[nn.Sequential, KasminaLayer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    layer = KasminaLayer(model, ["1"], seed=7, example_input=torch.zeros(2, 6))
    assert layer.apply_command(seed_command(SEED_OP_GERMINATE, issued_by="test", target_seed_id="1")).ok
    return model, layer


def test_a_manifest_built_at_birth_draws_each_seed_as_kasmina_did_and_trains_it_as_host() -> None:
    grown, layer = grown_layer()
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    added = build_at_birth(host, layer.manifest())
    seed = dict(grown.kasmina_seeds.seed1.body.named_parameters())
    assert added == sum(p.numel() for p in seed.values())
    fixed = dict(host.fixed_seeds.seed1.named_parameters())
    assert fixed.keys() == seed.keys() and all(torch.equal(fixed[k], seed[k]) for k in seed)
    assert all(p.requires_grad for p in fixed.values())
    assert not any(name.startswith("kasmina_seeds.") for name, _ in host.named_parameters())  # the host's group


def test_a_seed_built_at_birth_is_at_full_strength_from_the_first_forward() -> None:
    _, layer = grown_layer()
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    build_at_birth(host, layer.manifest())
    with torch.no_grad():
        host.fixed_seeds.seed1[2].weight.fill_(0.1)  # the zero output layer would hide the seed
    x = torch.randn(4, 6)
    h = torch.relu(host[0](x))
    expected = host[2](h + host.fixed_seeds.seed1(h))
    assert torch.allclose(host(x), expected)


def test_a_manifest_for_another_model_is_refused_with_the_fix(tmp_path: Path) -> None:
    _, layer = grown_layer()
    other = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"slots \['1'\] are not modules of this Sequential"):
        build_at_birth(other, layer.manifest())
    with pytest.raises(ValueError, match="does not exist"):
        read_manifest(tmp_path / "missing.json")
    (tmp_path / "summary.json").write_text(json.dumps({"final_manifest": layer.manifest()}))
    assert read_manifest(tmp_path / "summary.json") == layer.manifest()
