"""The one-run report's HTML page: the header table, the resume, seed-event, incident, config and
profile sections, and the plots embedded as base64 with a link to each PNG (so the folder works
when copied and the page works alone).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from esper.tolaria.config import flat_keys
from esper.tolaria.observe.report_data import ResumePoint, TelemetryStats, dicts, num
from esper.tolaria.observe.report_plots import PLOTS
from esper.tolaria.observe.report_view import RunView, conservative_spans, primary_metric, stage_name

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{margin-bottom:.2rem} h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem} th,td{border:1px solid #ddd;padding:.25rem .6rem;
text-align:left} th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#b00020;font-weight:600} .good{color:#1b7f3b} .muted{color:#777}
figure{margin:1rem 0} figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:.85rem;color:#555}
"""


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return f'<td class="{"good" if value else "bad"}">{value}</td>'
    if isinstance(value, float):
        return f'<td class="num">{_fmt(value)}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value:,}</td>'
    if isinstance(value, (dict, list)):
        return f"<td>{escape(json.dumps(value, sort_keys=True))}</td>"
    return f"<td>{escape('' if value is None else value)}</td>"


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.4g}"


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _header_rows(run: RunView, telemetry: TelemetryStats) -> list[tuple[str, Any]]:
    s = run.summary
    seeds = s.get("seeds") if isinstance(s.get("seeds"), dict) else {}
    stages = Counter(stage_name(v.get("stage", "")) for v in (seeds or {}).values() if isinstance(v, dict))
    tel = s.get("telemetry") if isinstance(s.get("telemetry"), dict) else {}
    drills = dicts(s.get("drills"))
    return [
        ("run id", s.get("run_id", "?")),
        ("config", s.get("config_path", s.get("experiment", ""))),
        ("epochs completed", s.get("epochs_completed", len(run.history))),
        (f"final validation {primary_metric(s)}", num((s.get("final_val_metrics") or {}).get(
            primary_metric(s), s.get("final_val_accuracy")))),
        ("final validation loss", num(s.get("final_val_loss"))),
        (f"best validation {primary_metric(s)}", _best_text(run)),
        ("training time", f"{math.fsum(run.series('epoch_seconds')[1]):.1f} s over {len(run.history)} epochs"),
        ("resumed", resumed_text(run.resumes)),
        ("parameters", s.get("param_count", "?")),
        ("morphogenesis", s.get("morphogenesis", "?")),
        ("seeds fossilized / culled / total", f"{stages['FOSSILIZED']} / {stages['CULLED']} / {len(seeds or {})}"),
        ("rollbacks", len(run.rollbacks)),
        ("emergencies", len(run.emergencies)),
        ("conservative-mode epochs", len(run.conservative_epochs)),
        ("telemetry published / dropped", f"{(tel or {}).get('published', 0)} / {(tel or {}).get('dropped', 0)}"),
        ("telemetry.jsonl lines (skipped)", f"{telemetry.lines} ({telemetry.skipped})"),
        ("drills", ", ".join(f"{d.get('kind')}@{d.get('epoch')}: {d.get('outcome')}" for d in drills) or "none"),
        ("final state sha256", str(s.get("final_state_sha256", ""))[:16]),
    ]


def _best_text(run: RunView) -> str:
    best, epoch = run.best(primary_metric(run.summary))
    return "n/a" if math.isnan(best) else f"{best:.4g} at epoch {epoch:g}"


def resumed_text(resumes: Sequence[ResumePoint]) -> str:
    """Every resume in one line, oldest first: `yes, 2× (at epoch 2 (step 40, from ckpt-…), …)`, or `no`."""
    if not resumes:
        return "no"
    where = ", ".join(f"at epoch {p.epoch} (step {p.step}, from {p.checkpoint})" for p in resumes)
    return f"yes, {len(resumes)}× ({where})"


def _seed_event_sections(run: RunView) -> str:
    rows = [{"epoch": e.epoch, "seed": e.seed_id, "event": e.stage.lower(), "reason": e.reason}
            for e in run.seed_events]
    culls = [e for e in run.seed_events if e.stage == "CULLED"]
    cull_list = ("<ul>" + "".join(f"<li>{escape(e.seed_id)} at epoch {e.epoch}: {escape(e.reason)}</li>"
                                  for e in culls) + "</ul>") if culls else '<p class="muted">No seed was culled.</p>'
    return ('<h2 id="seed-events">Seed events</h2><p>Marked on the loss and metric curves: ▲ germinated, '
            "★ fossilized, × culled. The reason is the boundary command's.</p>"
            + html_table(rows, ["epoch", "seed", "event", "reason"], "No seed events.")
            + f'<h2 id="cull-reasons">Cull reasons</h2>{cull_list}')


def _resume_section(run: RunView) -> str:
    epochs = run.series("epoch")[0]
    covered = (f"The page covers epochs {epochs[0]:g} to {epochs[-1]:g}, every segment of the run."
               if epochs else "No epochs recorded.")
    if not run.resumes:
        return f'<h2 id="resumes">Resumes</h2><p>Not resumed: one process ran the whole run. {covered}</p>'
    rows = [{"resume": i + 1, "resumed at epoch": p.epoch, "from step": p.step, "checkpoint": p.checkpoint}
            for i, p in enumerate(run.resumes)]
    return (f'<h2 id="resumes">Resumes</h2><p>This run was resumed {len(run.resumes)}×. {covered} Each resume '
            "is a dotted blue line on the plots.</p>"
            + html_table(rows, ["resume", "resumed at epoch", "from step", "checkpoint"], ""))


def _config_section(config: Mapping[str, Any]) -> str:
    rows = [{"key": k, "value": v} for k, v in sorted(flat_keys(config).items())]
    return ('<h2 id="config">Config</h2><p>The effective config, from <a href="../config.json">config.json</a> '
            "(the keys as <code>--set</code> spells them).</p>"
            + html_table(rows, ["key", "value"], "No config.json in the run directory."))


def _image(name: str, title: str, png: Path, embed: bool) -> str:
    src = f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" if embed else png.name
    return (f'<figure id="{name}"><img alt="{escape(title)}" src="{src}">'
            f'<figcaption>{escape(title)} — <a href="{escape(png.name)}">{escape(png.name)}</a></figcaption></figure>')


def _profile_section(trace_rows: Sequence[Mapping[str, Any]], problem: str) -> str:
    if problem:
        return f'<h2>Profile</h2><p class="bad">{escape(problem)}</p>'
    if not trace_rows:
        return ('<h2>Profile</h2><p class="muted">No trace.json: run with <code>--profile</code> to record '
                "step and boundary spans.</p>")
    return ("<h2>Profile</h2><p>Spans from <a href=\"../trace.json\">trace.json</a> (open it in "
            "<a href=\"https://ui.perfetto.dev\">Perfetto</a> or chrome://tracing).</p>"
            + html_table(trace_rows, ["span", "count", "p50 ms", "p99 ms", "max ms", "total ms"], ""))


def _sections(run: RunView, telemetry: TelemetryStats) -> list[str]:
    s = run.summary
    spans = [{"first epoch": a, "last epoch": b, "epochs": b - a + 1}
             for a, b in conservative_spans(run.conservative_epochs)]
    cons = s.get("conservative_mode") if isinstance(s.get("conservative_mode"), dict) else {}
    reasons = [str(r) for r in (cons or {}).get("reasons", [])]
    seeds = s.get("seeds") if isinstance(s.get("seeds"), dict) else {}
    seed_rows = [{"seed": k, "slot": v.get("slot"), "blueprint": v.get("blueprint"), "stage": v.get("stage"),
                  "path": " → ".join(f"{stage_name(h.get('stage'))}@{h.get('epoch')}"
                                     for h in dicts(v.get("stage_history")))}
                 for k, v in sorted((seeds or {}).items()) if isinstance(v, dict)]
    breakers = s.get("breakers") if isinstance(s.get("breakers"), dict) else {}
    breaker_rows = [{"breaker": k, **v} for k, v in sorted((breakers or {}).items()) if isinstance(v, dict)]
    tel_rows = [{"stream": k, "entries": n} for k, n in telemetry.by_stream.most_common()]
    event_rows = [{"event": k, "count": n} for k, n in telemetry.events.most_common()]
    return [
        "<h2>Rollbacks</h2>" + html_table(run.rollbacks, ["rollback_id", "tier", "epoch", "step", "target_epoch",
                                                      "target_step", "reason", "succeeded", "phase_ms"],
                                      "No rollbacks."),
        "<h2>Emergencies</h2>" + html_table(run.emergencies, ["level", "kind", "reason", "epoch", "step", "action",
                                                          "ok", "duration_ms", "escalated_to"], "No emergencies."),
        "<h2>Conservative mode</h2>" + html_table(spans, ["first epoch", "last epoch", "epochs"],
                                              "Never entered conservative mode.")
        + (f"<p>Entered {cons.get('entered', 0)}×, exited {cons.get('exited', 0)}×. Reasons: "
           + escape("; ".join(reasons)) + "</p>" if cons and reasons else ""),
        "<h2>Seeds</h2>" + html_table(seed_rows, ["seed", "slot", "blueprint", "stage", "path"], "No seeds."),
        "<h2>Drills</h2>" + html_table(dicts(s.get("drills")), ["kind", "epoch", "step", "outcome"], "No drills."),
        "<h2>Circuit breakers</h2>" + html_table(breaker_rows,
                                                 ["breaker", "state", "failures", "opened", "last_reason"],
                                                 "No breaker data."),
        "<h2>Telemetry</h2>" + html_table(tel_rows, ["stream", "entries"], "No telemetry.jsonl entries.")
        + html_table(event_rows, ["event", "count"], "No telemetry events."),
    ]


def render_html(run: RunView, telemetry: TelemetryStats, pngs: Mapping[str, Path], *, embed: bool = True,
                trace_rows: Sequence[Mapping[str, Any]] = (), trace_problem: str = "",
                config: Mapping[str, Any] | None = None) -> str:
    """The report page; `pngs` maps plot name -> PNG path in the report folder."""
    title = f"Tolaria run {run.summary.get('run_id', '?')}"
    header = "".join(f"<tr><th>{escape(k)}</th>{_cell(v)}</tr>" for k, v in _header_rows(run, telemetry))
    images = "".join(_image(name, PLOTS[name][0], png, embed) for name, png in pngs.items())
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1>"
            f"<table>{header}</table>{_resume_section(run)}<h2>Plots</h2>"
            '<p class="muted">Static PNGs drawn by matplotlib (no zoom); each links its file.</p>'
            f"{images}{_seed_event_sections(run)}{''.join(_sections(run, telemetry))}"
            f"{_config_section(config or {})}{_profile_section(trace_rows, trace_problem)}</body></html>")


