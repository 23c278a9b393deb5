"""`tolaria watch` on runs sharing one Redis: epoch lines with the epoch and the run id, run markers,
ratios as percentages, the `--run`/`--level`/`--stream` filters, and one hint for a wrong secret."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from oona_support import SECRET, unique_streams
from rich.console import Console
from trainer_fixtures import small_config  # type: ignore[import-not-found]

from esper.leyline import (
    BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL,
    BUS_MESSAGE_TYPE_TELEMETRY,
    EMERGENCY_LEVEL_HALT,
    TELEMETRY_LEVEL_INFO,
    TELEMETRY_LEVEL_WARNING,
    EmergencySignal,
    TelemetryEvent,
    TelemetryPacket,
)
from esper.oona import RedisBus, StreamNames, envelope_for
from esper.oona.watch import WatchFilter, parse_level, watch
from esper.tolaria.loop.build import build_trainer

pytestmark = pytest.mark.redis


def _watch(url: str, names: StreamNames, *, secret: bytes | None = SECRET, **options: Any) -> tuple[int, list[str]]:
    out = io.StringIO()
    shown = watch(url, follow=False, from_start=True, names=names, secret=secret,
                  console=Console(file=out, width=400, color_system=None), **options)
    return shown, out.getvalue().splitlines()


@pytest.fixture(scope="module")
def two_runs(redis_url: str) -> Iterator[tuple[StreamNames, str, str]]:
    """Two real runs publishing to the same streams, one after the other; their run ids."""
    streams = unique_streams()
    ids = []
    for name in ("alpha", "beta"):
        bus = RedisBus(redis_url, streams=streams, secret=SECRET)
        trainer = build_trainer(small_config(run={"name": name, "epochs": 2}), bus=bus)
        try:
            trainer.fit()
        finally:
            trainer.close()
            bus.close()
        ids.append(trainer.run_id)
    yield streams, ids[0], ids[1]


def test_watch_run_keeps_only_that_runs_lines(redis_url: str, two_runs: tuple[StreamNames, str, str]) -> None:
    streams, alpha, beta = two_runs
    _, everything = _watch(redis_url, streams)
    assert any(alpha in line for line in everything) and any(beta in line for line in everything)
    shown, lines = _watch(redis_url, streams, where=WatchFilter(run=alpha))
    assert shown == len(lines) > 0
    assert all(alpha in line for line in lines) and not any(beta in line for line in lines)
    assert f"▶ run {alpha} started at epoch 0 (step 0) of 2 epochs" in lines[0]
    assert f"■ run {alpha} finished at epoch 2" in lines[-1]
    epoch_lines = [line for line in lines if "tolaria.val.loss=" in line]
    assert [f"run={alpha} epoch {e}  " in line for e, line in enumerate(epoch_lines)] == [True, True]


def test_ratios_are_printed_as_percentages(redis_url: str, two_runs: tuple[StreamNames, str, str]) -> None:
    streams, alpha, _ = two_runs
    _, lines = _watch(redis_url, streams, where=WatchFilter(run=alpha))
    epoch_line = next(line for line in lines if "tolaria.val.accuracy=" in line)
    value = epoch_line.split("tolaria.val.accuracy=")[1].split("  ")[0]
    assert value.endswith(" %") and 0 < float(value.removesuffix(" %")) <= 100, value
    assert " ratio" not in epoch_line


def _publish_levels(bus: RedisBus) -> None:
    for level, what in ((TELEMETRY_LEVEL_INFO, "calm"), (TELEMETRY_LEVEL_WARNING, "tamiyo_timeout")):
        packet = TelemetryPacket(packet_id=what, source_subsystem="tolaria", level=level)
        packet.events.append(TelemetryEvent(description=what))
        bus.publish("telemetry", envelope_for(BUS_MESSAGE_TYPE_TELEMETRY, packet, run_id="r1"))
    signal = EmergencySignal(version=1, level=EMERGENCY_LEVEL_HALT, reason="loss is NaN", origin="tolaria",
                             run_id="r1")
    bus.publish("emergency", envelope_for(BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL, signal, run_id="r1"))


@pytest.fixture()
def levels(redis_url: str) -> Iterator[StreamNames]:
    streams = unique_streams()
    bus = RedisBus(redis_url, streams=streams, secret=SECRET)
    try:
        _publish_levels(bus)
        yield streams
    finally:
        bus.close()


def test_watch_level_keeps_entries_at_or_above_the_severity(redis_url: str, levels: StreamNames) -> None:
    assert _watch(redis_url, levels)[0] == 3
    _, warnings = _watch(redis_url, levels, where=WatchFilter(min_level=parse_level("warning")))
    assert len(warnings) == 2 and "tamiyo_timeout" in warnings[0] and "EMERGENCY HALT" in warnings[1]
    _, halts = _watch(redis_url, levels, where=WatchFilter(min_level=parse_level("halt")))
    assert len(halts) == 1 and "EMERGENCY HALT loss is NaN" in halts[0]


def test_watch_stream_shows_only_the_streams_named(redis_url: str, levels: StreamNames) -> None:
    _, lines = _watch(redis_url, levels, streams=("emergency",))
    assert len(lines) == 1 and levels.emergency in lines[0]


def test_a_wrong_secret_gives_one_hint_not_a_line_per_entry(redis_url: str, levels: StreamNames) -> None:
    shown, lines = _watch(redis_url, levels, secret=b"not the run's secret")
    assert shown == 1
    assert len(lines) == 2
    assert "✗ bad signature: check ESPER_LEYLINE_SECRET matches the run's" in lines[0]
    assert lines[1] == "3 entries had bad signatures (only the first is shown); check ESPER_LEYLINE_SECRET"


def test_an_unknown_level_is_one_line_naming_the_choices(redis_url: str) -> None:
    with pytest.raises(ValueError, match="--level 'loud' is not a level: use info, warning, error or critical"):
        parse_level("loud")
    done = subprocess.run([sys.executable, "-m", "esper.tolaria", "watch", redis_url, "--level", "loud"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["tolaria watch: error: --level 'loud' is not a level: use info, "
                                                "warning, error or critical (or the emergency names notice, "
                                                "elevated, conservative, halt)"]
