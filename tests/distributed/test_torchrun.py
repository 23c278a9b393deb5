"""Tolaria under torchrun: two real gloo processes grow the same model, roll back together,
and resume bit-exactly after one of them is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from job_toml import job_toml  # type: ignore[import-not-found]

from esper.tolaria.checkpoint import recover
from esper.tolaria.observe.steplog import read_step_log

GROWTH = """
plateau_threshold = 1.0     # growth decisions follow epoch counts only, so float noise cannot change them
shadow_epochs = 1
probation_epochs = 1
fossilize_tolerance = 10.0
cull_tolerance = 10.0
"""


def write_config(tmp_path: Path, tag: str) -> Path:
    path = tmp_path / f"{tag}.toml"
    path.write_text(job_toml(f"dist-{tag}", epochs=8, seed=1, tamiyo=GROWTH))
    return path


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "esper.tolaria", *args, "--quiet", "--no-report"]


def single(*args: str) -> list[str]:
    return [sys.executable, "-m", "esper.tolaria", *args, "--quiet", "--no-report"]


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]


def summaries(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    return (json.loads((run_dir / "summary.json").read_text()),
            json.loads((run_dir / "summary.rank1.json").read_text()))


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    loaded = recover(run_dir / "checkpoints", clean=False).checkpoint
    assert loaded is not None
    return loaded.state["model"]  # type: ignore[no-any-return]


def test_two_ranks_grow_identically_and_match_one_process_on_the_same_global_batch(tmp_path: Path) -> None:
    run(torchrun("run", str(write_config(tmp_path, "two")), "--run-dir", str(tmp_path / "two")))
    run(single("run", str(write_config(tmp_path, "one")), "--run-dir", str(tmp_path / "one")))
    rank0, rank1 = summaries(tmp_path / "two")
    assert rank0["world_size"] == 2 and rank0["ranks_final_state_match"] is True
    assert rank0["final_state_sha256"] == rank1["final_state_sha256"]
    assert [h["val_loss"] for h in rank0["history"]] == [h["val_loss"] for h in rank1["history"]]
    assert any(s["stage"] == "FOSSILIZED" for s in rank0["seeds"].values()), rank0["seeds"]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert {k: v["stage_history"] for k, v in one["seeds"].items()} == \
        {k: v["stage_history"] for k, v in rank0["seeds"].items()}
    two_model, one_model = final_model(tmp_path / "two"), final_model(tmp_path / "one")
    assert two_model.keys() == one_model.keys()
    for name, tensor in one_model.items():
        torch.testing.assert_close(two_model[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_a_nan_on_rank_1_only_rolls_both_ranks_back_to_the_same_snapshot(tmp_path: Path) -> None:
    run(torchrun("run", str(write_config(tmp_path, "nan")), "--run-dir", str(tmp_path / "nan"),
                 "--inject", "nan-loss@epoch=2,step=3,rank=1"))
    rank0, rank1 = summaries(tmp_path / "nan")
    assert rank1["emergencies"][0]["kind"] == "loss_nonfinite"
    assert rank0["emergencies"][0]["kind"] == "peer_incident"
    targets = [r["target_snapshot_id"] for r in (rank0["rollbacks"][0], rank1["rollbacks"][0])]
    assert targets[0] == targets[1] and all(r["rollbacks"][0]["succeeded"] for r in (rank0, rank1))
    assert rank0["epochs_completed"] == 8 and rank0["ranks_final_state_match"] is True


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        for child in map(int, children):
            out += [child, *_descendants(child)]
    return out


def _workers(agent: int) -> list[int]:
    found = []
    for pid in _descendants(agent):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"esper.tolaria" in cmdline and b"torch.distributed.run" not in cmdline:
            found.append(pid)
    return found


def test_killing_one_rank_then_resuming_continues_bit_exactly(tmp_path: Path) -> None:
    run(torchrun("run", str(write_config(tmp_path, "ref")), "--run-dir", str(tmp_path / "ref")))
    victim_dir = tmp_path / "victim"
    agent = subprocess.Popen(torchrun("run", str(write_config(tmp_path, "victim")), "--run-dir", str(victim_dir)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list((victim_dir / "checkpoints").glob("ckpt-*"))) < 2 and agent.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    workers = _workers(agent.pid)
    assert workers, "torchrun has no workers to kill"
    os.kill(workers[-1], signal.SIGKILL)
    assert agent.wait(120) != 0, "the job must fail when a rank dies"
    run(torchrun("resume", str(victim_dir)))
    ref, resumed = json.loads((tmp_path / "ref" / "summary.json").read_text()), \
        json.loads((victim_dir / "summary.json").read_text())
    assert resumed["resumed_from"].startswith("ckpt-") and resumed["ranks_final_state_match"] is True
    assert read_step_log(victim_dir / "steps.csv") == read_step_log(tmp_path / "ref" / "steps.csv")
    assert resumed["final_state_sha256"] == ref["final_state_sha256"]
