"""`tolaria report RUN_DIR`: one self-contained HTML page with plots of what a run did.

Contract of `generate_report(run_dir)`:

- Reads `run_dir/summary.json` (required; a missing or unparsable file raises an error naming
  the path and the fix) and `run_dir/telemetry.jsonl` (optional; lines that are not JSON objects
  are skipped and counted).
- Writes `run_dir/report/index.html` and one PNG per plot beside it (loss, accuracy, lr, params,
  seeds, boundary). Every PNG exists and is non-empty, even for a run without epochs: a plot
  without data says so in the image. The HTML embeds each PNG as base64 and links the PNG
  file, so the folder works when copied and the page works alone.
- When `run_dir/trace.json` (written by `--profile`) exists, a table of span timings is added.
- The page covers the whole run, every segment of a resumed one (the history is restored with
  each checkpoint), and marks each resume (`report_data.resume_points`) on the plots and in text.
  Seed events are marked on the loss and metric curves and listed with their reasons; the best
  epoch, the config (`run_dir/config.json`), the wall-clock per epoch and the step losses
  (`steps.csv`, else the telemetry's step packets) are shown. The plots are static PNGs.
- Missing keys mean "nothing of that kind" (a run without seeds, rollbacks or telemetry);
  unknown keys are ignored.

The work is split by concern: `report_data` reads the run directory, `report_view` normalises the
summary, `report_plots` draws the PNGs, `report_html` writes the page; this module puts them together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esper.tolaria.observe.report_data import load_summary, read_run_config, read_telemetry, read_trace_stats
from esper.tolaria.observe.report_html import render_html
from esper.tolaria.observe.report_plots import PLOTS
from esper.tolaria.observe.report_view import RunView, conservative_spans

# What the tests import from here, from before the split.
__all__ = ["PLOTS", "REPORT_DIR", "RunView", "conservative_spans", "generate_report", "read_telemetry"]

REPORT_DIR = "report"


def _trace_rows(path: Path) -> tuple[list[dict[str, Any]], str]:
    try:
        return read_trace_stats(path), ""
    except ValueError as exc:
        return [], str(exc)


def generate_report(run_dir: Path, *, embed_images: bool = True) -> Path:
    """Write `run_dir/report/index.html` and its PNGs; returns the HTML path (see module docstring)."""
    run_dir = Path(run_dir)
    run = RunView.of(load_summary(run_dir), run_dir)
    telemetry = read_telemetry(run_dir / "telemetry.jsonl")
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    pngs = {name: plot(run, out / f"{name}.png") for name, (_, plot) in PLOTS.items()}
    index = out / "index.html"
    tmp = index.with_suffix(".html.tmp")
    trace_rows, trace_problem = _trace_rows(run_dir / "trace.json")
    page = render_html(run, telemetry, pngs, embed=embed_images, trace_rows=trace_rows, trace_problem=trace_problem,
                       config=read_run_config(run_dir))
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)  # a reader never sees half a page
    return index
