"""The one-run report on real runs: a resumed run covers every epoch from 0 and says where it was
resumed; seed events carry their reasons; the best epoch, the config, the epoch times and the step
losses are on the page; a run without seeds and one with a rollback render too."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from trainer_fixtures import MemoryBus, StopAfter, small_config  # type: ignore[import-not-found]

from esper.tolaria.drills import FaultPlan
from esper.tolaria.loop.build import build_trainer
from esper.tolaria.observe.report import PLOTS, RunView, generate_report
from esper.tolaria.observe.report_data import NO_REASON, resume_points, seed_events, step_losses
from esper.tolaria.observe.steplog import StepLog

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Sections(HTMLParser):
    """The page as {h2 heading: (its text, its table rows as lists of cell texts)}."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.sections: dict[str, tuple[list[str], list[list[str]]]] = {"": ([], [])}
        self._current, self._in_h2, self._heading = "", False, ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "h2":
            self._in_h2, self._heading = True, ""
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_h2, self._current = False, self._heading.strip()
            self.sections[self._current] = ([], [])
        elif tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.sections[self._current][1].append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self._heading += data
            return
        if self._cell is not None:
            self._cell.append(data)
        self.sections[self._current][0].append(data)

    def text(self, heading: str) -> str:
        return " ".join(self.sections[heading][0])

    def rows(self, heading: str) -> list[list[str]]:
        return self.sections[heading][1]

    def header(self) -> dict[str, str]:
        return {row[0]: row[1] for row in self.rows("") if len(row) == 2}



def _train(run_dir: Path, *, resume: bool = False, stop_after: int | None = None, drills: tuple[str, ...] = (),
           bus: Any = None, **sections: dict[str, Any]) -> Any:
    config = small_config(checkpoint={"enabled": True}, loggers={"csv": {"enabled": False}},
                          **{"run": {"epochs": 5}, "telemetry": {"jsonl": True, "step_log": True}, **sections})
    callbacks = (StepLog(run_dir / "steps.csv"), *((StopAfter(stop_after),) if stop_after is not None else ()))
    trainer = build_trainer(config, run_dir=run_dir, bus=bus, faults=FaultPlan.parse(list(drills)),
                            callbacks=callbacks)
    if resume:
        trainer.resume_from(run_dir / "checkpoints")
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A growing run stopped after epoch 1 and resumed to its end (epoch 4), in one directory."""
    run_dir = tmp_path_factory.mktemp("resumed") / "run"
    _train(run_dir, stop_after=1)
    _train(run_dir, resume=True)
    return run_dir


def test_a_resumed_runs_report_covers_every_epoch_from_0_and_says_where_it_resumed(resumed_run: Path) -> None:
    page = Sections(generate_report(resumed_run).read_text())
    summary = json.loads((resumed_run / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2, 3, 4]
    resumes = page.text("Resumes")
    assert "resumed 1×" in resumes and "epochs 0 to 4" in resumes
    assert page.rows("Resumes")[1][:2] == ["1", "2"], "the first resume, at epoch 2"
    assert page.header()["resumed"].startswith("yes, 1× (at epoch 2 (step ")
    assert page.header()["training time"].endswith("over 5 epochs")


def test_the_resume_point_comes_from_the_run_markers_and_else_from_the_summary(resumed_run: Path,
                                                                               tmp_path: Path) -> None:
    summary = json.loads((resumed_run / "summary.json").read_text())
    from_markers = resume_points(resumed_run, summary)
    assert [(p.epoch, p.checkpoint) for p in from_markers] == [(2, summary["resumed_from"])]
    bare = tmp_path / "bare"  # a Redis run: no telemetry.jsonl beside the summary
    bare.mkdir()
    assert resume_points(bare, summary) == from_markers


def test_seed_events_are_listed_with_the_boundary_commands_reason(resumed_run: Path) -> None:
    page = Sections(generate_report(resumed_run).read_text())
    rows = page.rows("Seed events")
    assert rows[0] == ["epoch", "seed", "event", "reason"]
    germinated = [r for r in rows[1:] if r[2] == "germinated"]
    assert germinated and germinated[0][3].startswith("germinate: val loss plateaued")
    for _, seed, _, reason in (r for r in rows[1:] if r[2] != "germinated"):
        assert reason.startswith("SEED_OP_") and f" {seed}: " in reason, "the command that named the seed"
    assert "No seed was culled." in page.text("Cull reasons")


def test_best_epoch_config_and_the_step_and_time_plots_are_on_the_page(resumed_run: Path) -> None:
    index = generate_report(resumed_run)
    page = Sections(index.read_text())
    summary = json.loads((resumed_run / "summary.json").read_text())
    accuracies = [h["val_accuracy"] for h in summary["history"]]
    best = max(accuracies)
    assert page.header()["best validation accuracy"] == f"{best:.4g} at epoch {accuracies.index(best)}"
    config = {row[0]: row[1] for row in page.rows("Config")[1:]}
    assert config["run.epochs"] == "5" and config["telemetry.step_log"] == "True"
    steps, losses = step_losses(resumed_run)
    assert steps == list(range(summary["global_step"])) and len(losses) == len(steps), "every step, from 0"
    for name in ("steps", "time"):
        assert (index.parent / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    assert "Static PNGs" in page.text("Plots")


def test_step_losses_fall_back_to_the_telemetrys_step_packets(resumed_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "telemetry.jsonl").write_bytes((resumed_run / "telemetry.jsonl").read_bytes())
    steps, losses = step_losses(copy)  # no steps.csv: every 50th step (telemetry.step_interval)
    assert steps == [0, 50] and all(loss > 0 for loss in losses)


def test_a_run_without_seeds_renders_every_section(tmp_path: Path) -> None:
    run_dir = tmp_path / "alone"
    _train(run_dir, run={"epochs": 3, "morphogenesis": False})
    page = Sections(generate_report(run_dir).read_text())
    assert "No seed events." in page.text("Seed events") and "No seed was culled." in page.text("Cull reasons")
    assert "Not resumed" in page.text("Resumes") and page.header()["resumed"] == "no"
    for name in PLOTS:
        assert (run_dir / "report" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)


def test_a_run_with_a_rollback_renders_it_on_the_page(tmp_path: Path) -> None:
    run_dir = tmp_path / "rolled"
    _train(run_dir, run={"epochs": 3}, drills=("loss-spike@epoch=1,step=10",), bus=MemoryBus())
    page = Sections(generate_report(run_dir).read_text())
    rollbacks = page.rows("Rollbacks")
    assert len(rollbacks) == 2 and "loss" in rollbacks[1][6], "one rollback, with its reason"
    assert page.header()["rollbacks"] == "1"
    assert "epochs 0 to 2" in page.text("Resumes")


def _summary_with_a_cull() -> dict[str, Any]:
    commands = {2: "germinate: val loss plateaued (best 1.0)",
                4: "SEED_OP_CULL a: cull: val_loss_delta 0.2 > cull_tolerance 0.05",
                5: "SEED_OP_FOSSILIZE b: advance: SEED_STAGE_PROBATIONARY after 1 epochs in stage",
                6: "SEED_OP_CULL a: cull: a command naming another seed"}
    return {"run_id": "r", "history": [{"epoch": e, "val_loss": 1.0 - 0.1 * e, "val_accuracy": 0.5 + 0.01 * e,
                                        "command": commands.get(e, "noop: cooling down")} for e in range(7)],
            "seeds": {"a": {"stage_history": [{"epoch": 2, "stage": "GERMINATED"}, {"epoch": 4, "stage": "CULLED"}]},
                      "b": {"stage_history": [{"epoch": 2, "stage": "GERMINATED"}, {"epoch": 3, "stage": "TRAINING"},
                                              {"epoch": 5, "stage": "FOSSILIZED"}, {"epoch": 6, "stage": "CULLED"}]}}}


def test_culls_are_listed_with_their_reasons_and_an_unexplained_one_says_so(tmp_path: Path) -> None:
    summary = _summary_with_a_cull()
    events = [(e.epoch, e.seed_id, e.stage, e.reason) for e in seed_events(summary)]
    assert events == [(2, "a", "GERMINATED", summary["history"][2]["command"]),
                      (2, "b", "GERMINATED", summary["history"][2]["command"]),
                      (4, "a", "CULLED", summary["history"][4]["command"]),
                      (5, "b", "FOSSILIZED", summary["history"][5]["command"]),
                      (6, "b", "CULLED", NO_REASON)]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps(summary))
    page = Sections(generate_report(run_dir).read_text())
    culls = page.text("Cull reasons")
    assert "a at epoch 4: SEED_OP_CULL a: cull: val_loss_delta 0.2 > cull_tolerance 0.05" in culls
    assert f"b at epoch 6: {NO_REASON}" in culls
    assert "No config.json" in page.text("Config")


def test_best_epoch_follows_the_tasks_direction() -> None:
    summary = {"task": {"primary_metric": "perplexity", "higher_is_better": False},
               "history": [{"epoch": e, "val_metrics": {"perplexity": p}} for e, p in enumerate((9.0, 4.0, 6.0))]}
    assert RunView.of(summary).best("perplexity") == (4.0, 1.0)
