"""Slow: four gloo ranks under torchrun. A NaN in rank 3's data rolls all four back together, a hung
rank 2 makes every rank leave within the collective timeout + 10 s, and the restarted job ends
with the final state hash of the same job without the hang, every rank holding the same state."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_rank_faults import TIMEOUT_S, TimedLines, torchrun, write_config  # type: ignore[import-not-found]

pytestmark = pytest.mark.slow

NAN = "nan-loss@epoch=1,step=4,rank=3"


def test_four_ranks_roll_back_together_and_resume_bit_exactly_after_one_hangs(tmp_path: Path) -> None:
    config = write_config(tmp_path, "four")
    done = subprocess.run(torchrun("run", str(config), "--run-dir", str(tmp_path / "ref"), "--inject", NAN,
                                   ranks=4), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    others = [json.loads((tmp_path / "ref" / f"summary.rank{r}.json").read_text()) for r in (1, 2, 3)]
    assert ref["world_size"] == 4 and ref["ranks_final_state_match"] is True
    targets = {s["rollbacks"][0]["target_snapshot_id"] for s in (ref, *others)}
    assert len(targets) == 1 and others[2]["emergencies"][0]["kind"] == "loss_nonfinite"
    # The others saw the averaged NaN gradient, or only the vote: the same step's incident either way.
    assert {s["emergencies"][0]["kind"] for s in (ref, others[0], others[1])} <= {"peer_incident", "grad_nonfinite"}
    assert len({s["emergencies"][0]["step"] for s in (ref, *others)}) == 1

    job = TimedLines(torchrun("run", str(config), "--run-dir", str(tmp_path / "run"), "--inject", NAN,
                              "--inject", "rank-hang@epoch=2,step=6,rank=2", restarts=1, ranks=4))
    assert job.wait(600) == 0, job.text()[-6000:]
    hung = job.first("drill rank-hang: hanging at epoch 2 step 6 on rank 2")
    left = [at for at, line in job.lines if at >= hung and line.startswith("tolaria: ")
            and ("failed on rank" in line or "out of step with its peers" in line)]
    assert len(left) >= 4 and all(at - hung <= TIMEOUT_S + 10 for at in left), job.text()[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from"].startswith("ckpt-") and summary["ranks_final_state_match"] is True
    assert summary["final_state_sha256"] == ref["final_state_sha256"]
