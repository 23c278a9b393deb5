"""A rank whose collective failed is on its way out, flushing rank 0's checkpoint writes; torchrun
stops the group with SIGTERM the moment another rank dies. That signal must not cut the flush,
and must still act as before on a rank that lost nothing. Real signals, in a child process."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

CHILD = """
import os, signal, time
from esper.tolaria.distributed import World
from esper.tolaria.job import _signals_wait_while_leaving

world = World(rank=0, size=2, backend="gloo")  # no group needed: the guard reads world.sync only
world.sync.lost = {lost}
with _signals_wait_while_leaving(world):
    os.kill(os.getpid(), signal.{sig})
    time.sleep(0.5)  # the handler runs here
    print("flushed", flush=True)
"""


def _child(*, lost: bool, sig: str = "SIGTERM") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD.format(lost=lost, sig=sig)], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_waits_for_a_rank_that_lost_its_peer_to_flush(sig: str) -> None:
    done = _child(lost=True, sig=sig)
    assert done.returncode == 0 and done.stdout == "flushed\n", done.stderr


def test_a_stop_signal_still_ends_a_rank_that_lost_nothing() -> None:
    done = _child(lost=False)
    assert done.returncode == -signal.SIGTERM and "flushed" not in done.stdout, done.stderr
    interrupted = _child(lost=False, sig="SIGINT")
    assert "KeyboardInterrupt" in interrupted.stderr and "flushed" not in interrupted.stdout
