"""The console view: one unwrapped line per epoch off a terminal, an event line for every
emergency, rollback and seed transition, and on a real terminal (tmux) the live bar with ETA, it/s
and the running loss."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from trainer_fixtures import FAST_GROWTH, small_config  # type: ignore[import-not-found]

from esper.tolaria.drills import FaultPlan
from esper.tolaria.observe.progress import ConsoleProgress

ROOT = Path(__file__).resolve().parents[2]
CALM = {"boundary": {"state_assembly_ms": 1e4, "tamiyo_ms": 1e4, "apply_ms": 1e4, "check_ms": 1e4,
                     "total_ms": 1e5}, "handshake": {"tamiyo_timeout_s": 30.0}}


def plain_run(make_trainer: Any, drills: list[str], epochs: int = 4) -> list[str]:
    out = io.StringIO()
    view = ConsoleProgress(Console(file=out, width=60, soft_wrap=True, color_system=None))
    cfg = small_config(**CALM, **FAST_GROWTH, run={"epochs": epochs}, emergency={"spike_lr_factor": 1.0})
    trainer, _ = make_trainer(cfg, faults=FaultPlan.parse(drills), callbacks=[view])
    trainer.fit()
    assert not view.live, "a StringIO is no terminal: no bar"
    return out.getvalue().splitlines()


def test_off_a_terminal_each_epoch_is_one_unwrapped_line(make_trainer: Any) -> None:
    lines = plain_run(make_trainer, [])
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["0/3", "1/3", "2/3", "3/3"]
    assert all(len(line) > 60 for line in epochs), "longer than the console's width, and still one line"
    assert all(" acc " in line and " s " in line for line in epochs)


def test_emergencies_rollbacks_and_seed_transitions_get_their_own_lines(make_trainer: Any) -> None:
    lines = plain_run(make_trainer, ["nan-loss@epoch=2,step=3"])
    text = "\n".join(lines)
    assert "SEVERE loss_nonfinite at epoch 2 step" in text and "fast rollback ok" in text
    assert "rollback (fast) from epoch 2" in text
    assert any(line.startswith("seed ") and "-> " in line for line in lines), text
    emergency = next(i for i, line in enumerate(lines) if line.startswith("SEVERE"))
    repeated = [i for i, line in enumerate(lines) if line.startswith("epoch 2/3")]
    assert len(repeated) == 1 and emergency < repeated[0], "the rollback is said before the epoch runs again"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux for a real terminal")
def test_on_a_terminal_the_bar_shows_eta_speed_and_the_running_loss(tmp_path: Path) -> None:
    session = f"tolaria-progress-{time.monotonic_ns()}"
    cmd = (f"{sys.executable} -m esper.tolaria run {ROOT / 'examples' / 'digits.toml'} --run-dir {tmp_path / 'run'} "
           "--no-report --set run.epochs=40 --set run.threads=1 --set data.batch_size=2")  # epochs of ~700 steps:
    # on a quiet machine a 64-row epoch ends in ~30 ms, before the bar has a speed to show
    # A private tmux server (-L): a server already running elsewhere would start the command with *its*
    # environment and working directory, not this test's.
    tmux = ["tmux", "-L", session]
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "200", "-y", "40", cmd], check=True, cwd=ROOT)
    seen = ""
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", session], capture_output=True,
                                    text=True).stdout
            seen = screen or seen  # an empty capture: the session is gone; keep the last screen
            if re.search(r"it/s.*loss \d+\.\d{4}", seen) and "epoch 2/39" in seen:
                break
            time.sleep(0.2)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    bar = next((line for line in seen.splitlines() if "it/s" in line and "ETA" in line), "")
    assert re.search(r"\d+\.\d it/s", bar) and re.search(r"loss \d+\.\d{4}", bar), seen
    assert re.search(r"ETA \d+:\d\d:\d\d", bar) and "run 0:" in bar, seen
    assert "epoch 1/39" in seen, seen
