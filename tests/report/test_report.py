"""`tolaria report`: plots and an HTML page from summary.json (+ telemetry.jsonl), robust to sparse runs."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from esper.tolaria.observe.report import PLOTS, conservative_spans, generate_report, read_telemetry

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(epochs: int) -> list[dict[str, Any]]:
    return [{"epoch": e, "global_step": 40 * (e + 1), "train_loss": 2.0 / (e + 1), "val_loss": 2.2 / (e + 1),
             "val_accuracy": min(0.95, 0.3 + 0.06 * e),
             "lr": {"host": 0.01 * 0.9 ** e, **({"seed1": 0.001 * (e - 3)} if e > 3 else {})},
             "param_count": 460 + (132 if e > 3 else 0), "conservative_mode": e in (6, 7, 9),
             "epoch_seconds": 0.05} for e in range(epochs)]


def full_summary(epochs: int = 12) -> dict[str, Any]:
    return {
        "run_id": "run-<xss>", "config_path": "examples/digits.toml", "epochs_completed": epochs,
        "final_val_accuracy": 0.91, "final_val_loss": 0.2, "morphogenesis": True,
        "final_state_sha256": "ab" * 32, "param_count": 592,
        "history": _history(epochs),
        "seeds": {
            "seed1": {"slot": "stem", "blueprint": "residual_mlp", "stage": "FOSSILIZED",
                      "stage_history": [{"epoch": 3, "stage": "GERMINATED"}, {"epoch": 4, "stage": "TRAINING"},
                                        {"epoch": 6, "stage": "BLENDING"}, {"epoch": 9, "stage": "FOSSILIZED"}]},
            "seed2": {"slot": "body.1", "blueprint": "bottleneck", "stage": "CULLED",
                      "stage_history": [{"epoch": 5, "stage": "GERMINATED"}, {"epoch": 8, "stage": "CULLED"}]},
        },
        "boundary_ms": {"total": {"p50": 1.0, "p99": 3.0, "max": 4.0},
                        "phases": {"state_assembly": {"p50": 0.2, "p99": 0.5, "max": 0.6, "budget": 3.5},
                                   "tamiyo": {"p50": 0.4, "p99": 3.1, "max": 3.3, "budget": 12.0},
                                   "validate": {"p50": 3.0, "p99": 6.0, "max": 6.5}},
                        "budget_total_ms": 18.0},
        "conservative_mode": {"epochs": [6, 7, 9], "reasons": ["tamiyo timeout", "boundary breach"],
                              "entered": 2, "exited": 1},
        "telemetry": {"published": 58, "dropped": 3, "dropped_by_priority": {"LOW": 3}},
        "rollbacks": [{"rollback_id": "rb-1", "tier": "fast", "epoch": 7, "step": 320, "target_epoch": 5,
                       "target_step": 240, "reason": "loss 20x baseline", "succeeded": True,
                       "phase_ms": {"prepare": 3.0}}],
        "emergencies": [{"level": "SEVERE", "kind": "nan_loss", "reason": "NaN in loss", "epoch": 7, "step": 318,
                         "action": "fast_rollback", "ok": True, "duration_ms": 12.5, "escalated_to": None}],
        "drills": [{"kind": "tamiyo-hang", "epoch": 6, "step": 280, "outcome": "fallback"}],
        "breakers": {"tamiyo": {"state": "CLOSED", "failures": 1, "opened": 0}},
        "a_key_from_the_future": {"ignored": True},
    }


def _write(run_dir: Path, summary: dict[str, Any], telemetry: str | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if telemetry is not None:
        (run_dir / "telemetry.jsonl").write_text(telemetry)
    return run_dir


def _telemetry_lines() -> str:
    good = {"stream": "oona.telemetry", "message_type": "BUS_MESSAGE_TYPE_TELEMETRY", "time": 1.0,
            "payload": {"events": [{"description": "conservative_mode_entered"}]}}
    emergency = {"stream": "oona.emergency", "message_type": "BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL", "time": 2.0,
                 "payload": {"reason": "nan"}}
    return "\n".join([json.dumps(good), "{torn line", json.dumps(emergency), "[1, 2]", "", json.dumps(good)]) + "\n"


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One report of the full fixture run, shared by the tests that only read it."""
    return generate_report(_write(tmp_path_factory.mktemp("full") / "run", full_summary(), _telemetry_lines()))


def test_report_writes_html_and_one_nonempty_png_per_plot(full_report: Path) -> None:
    index = full_report
    assert index.parent.parent.joinpath("report", "index.html") == index
    for name in PLOTS:
        png = index.parent / f"{name}.png"
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name


def test_html_embeds_every_plot_and_links_the_png_files(full_report: Path) -> None:
    page = full_report.read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(PLOTS)
    assert all(base64.b64decode(b).startswith(PNG_MAGIC) for b in embedded)
    for name in PLOTS:
        assert f'href="{name}.png"' in page


def test_html_header_and_tables_show_the_run(full_report: Path) -> None:
    page = full_report.read_text()
    assert "run-&lt;xss&gt;" in page and "<xss>" not in page  # escaped
    for needle in ("0.91", "592", "1 / 1 / 2",  # fossilized / culled / total
                   "rb-1", "loss 20x baseline", "nan_loss", "fast_rollback",
                   "tamiyo-hang@6: fallback", "58 / 3", "tamiyo timeout; boundary breach",
                   "conservative_mode_entered", "oona.emergency"):
        assert needle in page, needle
    spans = re.search(r"<h2>Conservative mode</h2>(.*?)</table>", page, re.S)
    assert spans is not None
    cells = re.findall(r'<td class="num">(\d+)</td>', spans.group(1))
    assert cells == ["6", "7", "2", "9", "9", "1"]


def test_run_without_seeds_rollbacks_or_telemetry_still_reports(tmp_path: Path) -> None:
    summary = full_summary()
    for key in ("seeds", "rollbacks", "emergencies", "drills", "conservative_mode", "telemetry", "breakers",
                "boundary_ms"):
        summary.pop(key)
    for rec in summary["history"]:
        rec["conservative_mode"] = False
    page = generate_report(_write(tmp_path / "run", summary)).read_text()
    assert "No rollbacks." in page and "No emergencies." in page and "No seeds." in page
    assert "Never entered conservative mode." in page
    assert (tmp_path / "run" / "report" / "seeds.png").stat().st_size > 1_000


def test_empty_history_makes_placeholder_plots_not_a_crash(tmp_path: Path) -> None:
    index = generate_report(_write(tmp_path / "run", {"run_id": "r0", "history": []}))
    for name in PLOTS:
        assert (index.parent / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    assert "r0" in index.read_text()


def test_null_and_wrongly_typed_values_are_treated_as_missing(tmp_path: Path) -> None:
    summary = full_summary(4)
    summary["final_val_accuracy"] = None  # strict JSON writes NaN as null
    summary["history"][1]["val_loss"] = None
    summary["history"][2]["lr"] = "not a dict"
    summary["seeds"] = ["not", "a", "dict"]
    summary["rollbacks"] = {"oops": 1}
    page = generate_report(_write(tmp_path / "run", summary)).read_text()
    assert "n/a" in page
    assert "No rollbacks." in page


def test_missing_summary_raises_an_error_naming_the_file_and_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"summary\.json not found: .*tolaria run"):
        generate_report(tmp_path)


def test_corrupt_summary_raises_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"summary\.json is not valid JSON"):
        generate_report(tmp_path)
    (tmp_path / "summary.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        generate_report(tmp_path)


def test_telemetry_reader_counts_what_it_skips(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.jsonl"
    path.write_text(_telemetry_lines())
    stats = read_telemetry(path)
    assert (stats.lines, stats.parsed, stats.skipped) == (5, 3, 2)
    assert stats.by_stream == {"oona.telemetry": 2, "oona.emergency": 1}
    assert stats.events == {"conservative_mode_entered": 2}
    assert read_telemetry(tmp_path / "absent.jsonl").lines == 0


def test_conservative_epochs_collapse_into_spans() -> None:
    assert conservative_spans([9, 1, 2, 3, 7, 2]) == [(1, 3), (7, 7), (9, 9)]
    assert conservative_spans([]) == []


def test_rerunning_the_report_overwrites_it(tmp_path: Path) -> None:
    run_dir = _write(tmp_path / "run", full_summary())
    generate_report(run_dir)
    summary = full_summary()
    summary["run_id"] = "second"
    _write(run_dir, summary)
    page = generate_report(run_dir).read_text()
    assert "second" in page
    assert not list((run_dir / "report").glob("*.tmp"))


def test_profile_section_summarizes_the_chrome_trace(tmp_path: Path) -> None:
    from esper.tolaria.observe.profiling import Profiler

    run_dir = _write(tmp_path / "run", full_summary(3))
    prof = Profiler(True)
    for ms in (1, 2, 3):
        prof._record("step.forward", 0, ms * 1_000_000, 1, None)
    prof.write_chrome_trace(run_dir / "trace.json")
    page = generate_report(run_dir).read_text()
    profile = page[page.index("<h2>Profile</h2>"):]
    assert "step.forward" in profile and 'href="../trace.json"' in profile
    assert re.findall(r'<td class="num">([^<]+)</td>', profile)[:5] == ["3", "2", "2.98", "3", "6"]


def test_profile_section_without_trace_or_with_a_damaged_one(tmp_path: Path) -> None:
    run_dir = _write(tmp_path / "run", full_summary(3))
    assert "run with <code>--profile</code>" in generate_report(run_dir).read_text()
    (run_dir / "trace.json").write_text("{torn")
    page = generate_report(run_dir).read_text()
    assert "trace.json is not a Chrome trace" in page
    assert (run_dir / "report" / "loss.png").is_file()
