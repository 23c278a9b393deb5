"""What the report reads from a run directory: `summary.json`, `config.json`, the telemetry and
the trace, and what it derives beyond the summary's own fields: each seed event with the reason
the boundary gave, where the run was resumed, and the step losses.

Contracts:

- `load_summary(run_dir)`: `summary.json` as a dict; a missing or unparsable file, or one that is not
  a JSON object, raises an error naming the path and the fix.
- `read_run_config(run_dir)`: `config.json`, or {} when it is absent or unreadable.
- `read_telemetry(path)`: counts of `telemetry.jsonl`'s entries by stream, message type and event;
  lines that are not JSON objects are skipped and counted.
- `read_trace_stats(path)`: per span of a `--profile` Chrome trace, its count and p50/p99/max/total
  in ms; [] without the file, a ValueError naming it when it is damaged.
- `seed_events(summary)`: every germination, fossilization and cull in the run's history, in epoch
  order. Its reason is the `command` text of that epoch's history record when the command is the
  one that causes such an event for that seed (`SEED_OP_CULL seed2: cull: …`, `germinate: …`);
  otherwise the reason says no command of that boundary named it.
- `resume_points(run_dir, summary)`: every place the run was resumed, oldest first. The run-start
  markers in `telemetry.jsonl` name each resume (checkpoint, epoch, step); the summary's
  `resumed_from` (the last resume's checkpoint, `ckpt-<step>`) is used where the markers are absent
  (a Redis run, or `telemetry.jsonl` off), its epoch found from the history's global steps.
- `step_losses(run_dir)`: (global steps, losses) from `steps.csv` (`telemetry.step_log`), else
  from the step packets in `telemetry.jsonl`; a skipped step is left out.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper.tolaria.observe.steplog import read_step_log

RUN_STARTED = "run_started"  # the telemetry event `TelemetryCollector.run_started` publishes
STEP_LOSS_METRIC = "tolaria.step.loss"
_CHECKPOINT_STEP = re.compile(r"^ckpt-(\d{12})(?:\.t\d+)?$")
# The stage an event records -> the operation of the command that causes it, and how a reason
# without the `OP target:` prefix starts.
_CAUSES = {"GERMINATED": ("SEED_OP_GERMINATE", "germinate"), "CULLED": ("SEED_OP_CULL", "cull"),
           "FOSSILIZED": ("SEED_OP_FOSSILIZE", "advance: SEED_STAGE_PROBATIONARY")}
NO_REASON = "no command of this boundary named it"


@dataclass(frozen=True)
class SeedEvent:
    epoch: int
    seed_id: str
    stage: str  # GERMINATED, FOSSILIZED or CULLED
    reason: str


@dataclass(frozen=True)
class ResumePoint:
    epoch: int  # the first epoch the resumed process trained (it may repeat part of one)
    step: int  # the global step it started from
    checkpoint: str


def dicts(value: Any) -> list[dict[str, Any]]:
    """The dict items of a list-valued field; anything else is treated as absent."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def num(value: Any) -> float:
    """A number from the summary, NaN for null/missing/non-numeric (strict JSON writes NaN as null)."""
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, (int, float)) else math.nan


def _int(value: Any, default: int = -1) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return default


def seed_events(summary: Mapping[str, Any]) -> list[SeedEvent]:
    """Germinations, fossilizations and culls with the boundary's reason (see the module docstring)."""
    commands = {_int(h.get("epoch")): str(h.get("command") or "") for h in dicts(summary.get("history"))}
    seeds = summary.get("seeds") if isinstance(summary.get("seeds"), dict) else {}
    events = []
    for seed_id, seed in (seeds or {}).items():
        if not isinstance(seed, dict):
            continue
        for change in dicts(seed.get("stage_history")):
            stage = str(change.get("stage", "")).removeprefix("SEED_STAGE_")
            epoch = _int(change.get("epoch"))
            if stage not in _CAUSES or epoch < 0:
                continue
            command = commands.get(epoch, "")
            reason = command if _explains(command, stage, str(seed_id)) else NO_REASON
            events.append(SeedEvent(epoch, str(seed_id), stage, reason))
    return sorted(events, key=lambda e: (e.epoch, e.seed_id))


def _explains(command: str, stage: str, seed_id: str) -> bool:
    """Whether the boundary's command (`SEED_OP_CULL seed3: cull: …`, or a bare reason) caused `stage`
    for this seed. A germination names the slot it fills, not the new seed."""
    op, verb = _CAUSES[stage]
    if command.startswith(f"{op} "):
        return stage == "GERMINATED" or command[len(op) + 1:].split(":", 1)[0] == seed_id
    return command.startswith(verb)


def telemetry_entries(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a telemetry.jsonl file; torn or foreign lines are passed over."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("payload"), dict):
                yield entry


def resume_points(run_dir: Path, summary: Mapping[str, Any]) -> list[ResumePoint]:
    """Every resume of the run, oldest first (see the module docstring)."""
    points: dict[str, ResumePoint] = {}
    for entry in telemetry_entries(Path(run_dir) / "telemetry.jsonl"):
        for event in dicts(entry["payload"].get("events")):
            attributes = event.get("attributes") if isinstance(event.get("attributes"), dict) else {}
            checkpoint = str((attributes or {}).get("resumed_from", ""))
            if event.get("description") == RUN_STARTED and checkpoint:
                points[checkpoint] = ResumePoint(_int((attributes or {}).get("epoch"), 0),
                                                 _int((attributes or {}).get("step"), 0), checkpoint)
    last = str(summary.get("resumed_from") or "")
    if last and last not in points:
        step = checkpoint_step(last)
        if step is not None:
            ended = [_int(h.get("global_step")) for h in dicts(summary.get("history"))]
            points[last] = ResumePoint(sum(1 for s in ended if 0 <= s <= step), step, last)
    return sorted(points.values(), key=lambda p: (p.step, p.checkpoint))


def checkpoint_step(name: str) -> int | None:
    """The global step a committed checkpoint's name carries (`ckpt-000000000120.t7` -> 120)."""
    match = _CHECKPOINT_STEP.match(name)
    return int(match.group(1)) if match else None


def step_losses(run_dir: Path) -> tuple[list[int], list[float]]:
    """(global steps, losses), from steps.csv or else the telemetry's step packets."""
    path = Path(run_dir) / "steps.csv"
    by_step: dict[int, float] = {}
    if path.is_file():
        try:
            by_step = {step: float(text) for step, text in read_step_log(path).items() if text != "skipped"}
        except ValueError:
            by_step = {}  # a damaged file: fall back to the telemetry
    if not by_step:
        by_step = _telemetry_step_losses(Path(run_dir) / "telemetry.jsonl")
    steps = sorted(s for s, loss in by_step.items() if math.isfinite(loss))
    return steps, [by_step[s] for s in steps]


def _telemetry_step_losses(path: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for entry in telemetry_entries(path):
        for metric in dicts(entry["payload"].get("metrics")):
            attributes = metric.get("attributes") if isinstance(metric.get("attributes"), dict) else {}
            step = _int((attributes or {}).get("step"))
            value = metric.get("value")
            if metric.get("name") == STEP_LOSS_METRIC and step >= 0 and isinstance(value, (int, float)):
                out[step] = float(value)  # a re-run step's later packet wins, as in steps.csv
    return out


def load_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary.json as a dict; errors name the file and what to do."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: `tolaria report` needs the run directory of a finished "
                                f"`tolaria run` (it writes summary.json at the end of the run)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); rerun or resume the run to rewrite it") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, expected a JSON object written by `tolaria run`")
    return data


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/config.json, or {} when it is absent or unreadable (the report then says so)."""
    try:
        data = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class TelemetryStats:
    """What telemetry.jsonl held: counts by stream, message type and event description."""

    lines: int = 0
    parsed: int = 0
    skipped: int = 0
    by_stream: Counter[str] = field(default_factory=Counter)
    by_type: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)


def read_telemetry(path: Path) -> TelemetryStats:
    """Count the entries of a telemetry JSONL file, skipping (and counting) unparsable lines."""
    stats = TelemetryStats()
    if not path.is_file():
        return stats
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            stats.lines += 1
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                stats.skipped += 1
                continue
            if not isinstance(entry, dict):
                stats.skipped += 1
                continue
            stats.parsed += 1
            stats.by_stream[str(entry.get("stream", "?"))] += 1
            stats.by_type[str(entry.get("message_type", "?"))] += 1
            for event in dicts((entry.get("payload") or {}).get("events") if isinstance(entry.get("payload"),
                                                                                       dict) else None):
                stats.events[str(event.get("description", "?"))] += 1
    return stats


def read_trace_stats(path: Path) -> list[dict[str, Any]]:
    """Per span name in a Chrome trace written by `Profiler`: count, p50/p99/max/total in ms.

    An absent file gives []; an unreadable one raises ValueError naming it (the report shows that
    message instead of the table: a damaged trace must not cost the user the whole report).
    """
    if not path.is_file():
        return []
    try:
        events = json.loads(path.read_text(encoding="utf-8")).get("traceEvents", [])
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a Chrome trace ({exc}); delete it or rerun with --profile") from exc
    durations: dict[str, list[float]] = {}
    for event in dicts(events):
        if event.get("ph") == "X" and math.isfinite(num(event.get("dur"))):
            durations.setdefault(str(event.get("name")), []).append(num(event.get("dur")) / 1e3)
    rows = []
    for name, values in sorted(durations.items()):
        values.sort()
        rows.append({"span": name, "count": len(values), "p50 ms": _percentile(values, 50),
                     "p99 ms": _percentile(values, 99), "max ms": values[-1], "total ms": math.fsum(values)})
    return rows


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (numpy's default method)."""
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
