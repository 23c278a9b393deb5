"""torchrun stops a rank by signalling its whole process group (`os.killpg`), and a terminal's
Ctrl-C reaches the whole foreground group. The rank's own handler turns the signal into a stop
served at the next vote, after this step; the DataLoader workers of the loaders Tolaria builds
must outlive the signal until then, or the main process dies of "DataLoader worker killed by
signal" instead of checkpointing. A child in its own session, so the signal cannot reach pytest."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import os, signal, sys
os.setsid()  # a group of our own, as torchrun gives each rank
from esper.tolaria.config import DataConfig
from esper.tolaria.data import make_loaders

train, _, _, _ = make_loaders(DataConfig(dataset="digits", batch_size=64, num_workers=2), seed=0)
signal.signal(signal.SIGTERM, lambda *_: print("stop requested", flush=True))  # the rank's handler
batches = iter(train)
next(batches)
os.killpg(0, signal.SIGTERM)  # what torchrun's stop does to the rank
print("batches after the signal:", sum(1 for _ in batches), flush=True)
"""


def test_loader_workers_outlive_a_stop_signal_to_the_ranks_process_group() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stop requested" in done.stdout and "batches after the signal: " in done.stdout, done.stdout
    assert "killed by signal" not in done.stderr
