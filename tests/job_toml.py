"""TOML configs for tests that launch `tolaria` as real processes: small, fast-growing, and with
budgets and deadlines far above the work, so machine noise never changes a run's decisions."""

from __future__ import annotations

BASE = """
[run]
name = "{name}"
epochs = {epochs}
seed = {seed}
threads = 1

[data]
dataset = "digits"
batch_size = 64

[model]
hidden = [8]

[optimizer]
lr = 0.02

[checkpoint]
every_epochs = 1
keep_last = 3

[telemetry]
step_log = true

[handshake]
tamiyo_timeout_s = 30.0

[boundary]
state_assembly_ms = 10000.0
tamiyo_ms = 10000.0
apply_ms = 10000.0
check_ms = 10000.0
total_ms = 100000.0

[kasmina]
min_training_steps = 5
blend_steps = 10
seed_hidden = 16

[tamiyo]
plateau_window = 1
cooldown_epochs = 0
min_training_epochs = 1
"""


def job_toml(name: str, *, epochs: int, seed: int, tamiyo: str) -> str:
    """The base config plus extra `[tamiyo]` lines (e.g. tolerances that force a cull)."""
    return BASE.format(name=name, epochs=epochs, seed=seed) + tamiyo.strip() + "\n"
