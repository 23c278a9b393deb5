"""Observe: the typed run log, telemetry to Oona, boundary timing, profiling, live exporters,
progress, `summary.json` and the HTML report.

Owns: what the run tells people. May import `state`, `checkpoint.atomic` (files are written
atomically), `config`, `esper.contracts` and `esper.leyline`; never `loop`, `recovery` or `control`.
"""
