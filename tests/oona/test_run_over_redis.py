"""A real `tolaria` run over Redis: a remote `tamiyo serve` grows the model; Tolaria falls back when
the worker dies; a Redis outage mid-run never stalls training."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from esper.tolaria.config import config_from_dict
from esper.tolaria.loop.build import build_trainer

SECRET = "test-secret-for-oona-run"

GROWTH = {
    "kasmina": {"min_training_steps": 5, "blend_steps": 10, "seed_hidden": 16},
    "tamiyo": {"plateau_window": 1, "plateau_threshold": 1.0, "cooldown_epochs": 0, "min_training_epochs": 1,
               "shadow_epochs": 1, "probation_epochs": 1, "fossilize_tolerance": 10.0, "cull_tolerance": 10.0},
}


def config(url: str, epochs: int, **extra: Any) -> Any:
    return config_from_dict({
        "run": {"name": "oona-run", "epochs": epochs, "threads": 1},
        "data": {"dataset": "digits", "batch_size": 64}, "model": {"hidden": [8]}, "optimizer": {"lr": 0.02},
        "checkpoint": {"enabled": False}, "emergency": {"broadcast": False},
        "oona": {"url": url, "remote_tamiyo": True}, **GROWTH, **extra,
    })


@pytest.fixture()
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ESPER_LEYLINE_SECRET", SECRET)
    return SECRET


def serve(url: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    """A real `tamiyo serve` worker, configured with the same [tamiyo] thresholds as the run."""
    toml = tmp_path / "tamiyo.toml"
    toml.write_text("[tamiyo]\n" + "\n".join(f"{k} = {v}" for k, v in GROWTH["tamiyo"].items()) + "\n")
    env = dict(os.environ, ESPER_LEYLINE_SECRET=SECRET)
    worker = subprocess.Popen([sys.executable, "-m", "esper.tamiyo.cli", "serve", "--oona", url, "--config",
                               str(toml), "--log-level", "WARNING"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    assert worker.stdout is not None
    ready = worker.stdout.readline().decode()  # the worker says so once its consumer group exists
    assert ready.startswith("tamiyo serve: ready"), ready
    return worker


def test_a_run_with_a_remote_tamiyo_grows_and_falls_back_when_the_worker_dies(private_redis: Any, secret: str,
                                                                                tmp_path: Path) -> None:
    worker = serve(private_redis.url, tmp_path)
    try:
        trainer = build_trainer(config(private_redis.url, 9, handshake={"tamiyo_timeout_s": 1.0}))

        class KillWorker:
            def on_boundary_end(self, t: Any, epoch: int, report: Any) -> None:
                if epoch == 6:
                    worker.kill()
                    worker.wait(10)

        trainer.callbacks.append(KillWorker())
        started = time.perf_counter()
        summary = trainer.fit().summary
    finally:
        worker.kill()
        worker.wait(10)
    assert summary["epochs_completed"] == 9
    assert any(s["stage"] == "FOSSILIZED" for s in summary["seeds"].values()), summary["seeds"]
    fallbacks = summary["tamiyo_fallbacks"]
    assert fallbacks and all(f["epoch"] >= 7 and f["kind"] == "timeout" for f in fallbacks), fallbacks
    assert summary["boundary_ms"]["phases"]["tamiyo"]["max"] < 1000 * 1.0 + 500
    assert time.perf_counter() - started < 120
    assert summary["telemetry"]["published"] > 0


def test_redis_killed_mid_run_never_stalls_training_and_drops_are_counted(private_redis: Any,
                                                                          secret: str) -> None:
    cfg = config(private_redis.url, 6, telemetry={"step_interval": 1})
    cfg.oona.remote_tamiyo = False
    trainer = build_trainer(cfg)

    class Outage:
        def on_boundary_end(self, t: Any, epoch: int, report: Any) -> None:
            if epoch == 1:
                private_redis.stop()
            if epoch == 3:
                private_redis.start()

    trainer.callbacks.append(Outage())
    epoch_seconds: list[float] = []

    class Clock:
        def on_boundary_end(self, t: Any, epoch: int, report: Any) -> None:
            epoch_seconds.append(t.log.epochs[-1].epoch_seconds)

    trainer.callbacks.append(Clock())
    summary = trainer.fit().summary
    assert summary["epochs_completed"] == 6
    assert summary["telemetry"]["publish_failures"] > 0
    assert max(epoch_seconds[2:4]) < 5 * max(epoch_seconds[0], 0.05), epoch_seconds
    assert trainer.bus.reconnects_total >= 1  # type: ignore[attr-defined]
