"""Two real gloo ranks, each running a whole trainer in its own process: a decision that one rank's
view alone would trigger is taken by both ranks at the same point, so neither enters a collective
the other never reaches (which would hang until the group's timeout)."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from esper.tolaria.config import config_from_dict
from esper.tolaria.distributed import World
from esper.tolaria.loop.build import build_trainer

FAST_GROWTH = {
    "kasmina": {"min_training_steps": 5, "blend_steps": 10, "seed_hidden": 16},
    "tamiyo": {"plateau_window": 1, "plateau_threshold": 1.0, "cooldown_epochs": 0, "min_training_epochs": 1,
               "shadow_epochs": 1, "probation_epochs": 1, "fossilize_tolerance": 10.0, "cull_tolerance": 10.0},
}
COLLAPSE_EPOCH = 2  # rank 1's validation labels are wrong at this epoch only
STOP_AT = (1, 5)  # (epoch, batch position) after which rank 1 alone receives SIGTERM


def _config(name: str, epochs: int) -> Any:
    return config_from_dict({
        "run": {"name": name, "epochs": epochs, "seed": 1, "threads": 1},
        "data": {"dataset": "digits", "batch_size": 64},
        "optimizer": {"lr": 0.02},
        "model": {"hidden": [8]},
        "checkpoint": {"every_epochs": 1, "keep_last": 3},
        "telemetry": {"jsonl": False},
        "emergency": {"broadcast": False},
        "handshake": {"tamiyo_timeout_s": 30.0},
        "boundary": {"state_assembly_ms": 1e4, "tamiyo_ms": 1e4, "apply_ms": 1e4, "check_ms": 1e4, "total_ms": 1e5},
        "distributed": {"timeout_s": 20.0},
        **FAST_GROWTH,
    })


class WrongLabelsOnce:
    """A validation loader whose pass number `bad` shifts every label: accuracy collapses there."""

    def __init__(self, inner: Any, bad: int) -> None:
        self.inner, self.bad, self.passes = inner, bad, 0

    def __iter__(self) -> Iterator[Any]:
        wrong = self.passes == self.bad
        self.passes += 1
        for x, y in self.inner:
            yield (x, (y + 1) % 10) if wrong else (x, y)


class SignalAt:
    """Sends this process SIGTERM as one step ends, as a scheduler might on one host only: after the
    step's vote, so the request must wait for the next one (a rank acting on it at once would leave
    its peer in the next step's collectives)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.at, self.sent = (epoch, batch), False

    def on_step_end(self, trainer: Any, step: int, loss: Any) -> None:
        if not self.sent and (trainer.state.epoch, trainer.state.batch_in_epoch) == self.at:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def collapse_on_one_rank(world: World, run_dir: Path) -> dict[str, Any]:
    trainer = build_trainer(_config("collapse", 4), run_dir=run_dir, world=world)
    if world.rank == 1:
        trainer.val_loader = WrongLabelsOnce(trainer.val_loader, COLLAPSE_EPOCH)
    return trainer.fit().summary


def sigterm_on_one_rank(world: World, run_dir: Path) -> dict[str, Any]:
    callbacks = (SignalAt(*STOP_AT),) if world.rank == 1 else ()
    trainer = build_trainer(_config("sigterm", 3), run_dir=run_dir, world=world, callbacks=callbacks)
    result = trainer.fit().summary
    return {**result, "global_step": trainer.state.global_step}


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    world = World.from_env("cpu", timeout_s=20.0)
    try:
        seen = {"collapse": collapse_on_one_rank(world, Path(out, "collapse")),
                "sigterm": sigterm_on_one_rank(world, Path(out, "sigterm"))}
        Path(out, f"rank{rank}.json").write_text(json.dumps(seen, default=str))
    finally:
        world.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("agree")
    # A rank that acted alone makes the other's next collective time out (20 s): the spawn raises.
    mp.start_processes(_rank_main, args=(_free_port(), str(out)), nprocs=2, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_an_accuracy_collapse_in_one_ranks_data_rolls_both_ranks_back_from_the_same_checkpoint(
        ranks: list[dict[str, Any]]) -> None:
    zero, one = (seen["collapse"] for seen in ranks)
    assert [e["kind"] for e in one["emergencies"]] == ["accuracy_collapse"]
    assert [e["kind"] for e in zero["emergencies"]] == ["peer_incident"]  # rank 0's data was fine
    assert [e["level"] for e in zero["emergencies"]] == ["major"] and zero["emergencies"][0]["ok"]
    [back0], [back1] = zero["rollbacks"], one["rollbacks"]
    assert back0["tier"] == back1["tier"] == "full" and back0["succeeded"] and back1["succeeded"]
    assert back0["target_snapshot_id"] == back1["target_snapshot_id"] and back0["epoch"] == COLLAPSE_EPOCH
    assert zero["epochs_completed"] == one["epochs_completed"] == 4
    assert zero["final_state_sha256"] == one["final_state_sha256"]


def test_sigterm_on_one_rank_stops_both_ranks_at_the_same_step_with_rank_0s_checkpoint(
        ranks: list[dict[str, Any]]) -> None:
    zero, one = (seen["sigterm"] for seen in ranks)
    assert zero["stopped"] == one["stopped"] == "SIGTERM"  # rank 0 got no signal: it took rank 1's
    assert zero["global_step"] == one["global_step"]
    assert zero["final_state_sha256"] == one["final_state_sha256"]
    stop = zero["safety"]["checkpoints"][-1]
    assert stop["reason"] == "stopped by SIGTERM" and stop["step"] == zero["global_step"]
    assert zero["epochs_completed"] == STOP_AT[0]  # stopped inside epoch 1, after its step 5
