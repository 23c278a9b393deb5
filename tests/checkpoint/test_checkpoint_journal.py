"""Which journaled commands a resume replays (the current history after the checkpoint), and that
journaling is safe beside the async checkpoint writer (issue item 12, store side)."""

from __future__ import annotations

import threading
from pathlib import Path

from ckpt_helpers import make_snapshot

from esper.leyline import SEED_OP_GERMINATE, AdaptationCommand, parse, seed_command
from esper.tolaria.checkpoint import CheckpointStore, recover
from esper.tolaria.checkpoint.wal import replay


def _germinate(slot: str) -> AdaptationCommand:
    return seed_command(SEED_OP_GERMINATE, issued_by="test", target_seed_id=slot, blueprint_id="mlp")


def _replayed(directory: Path) -> list[tuple[int, str]]:
    result = recover(directory, clean=False)
    return [(r.step, parse(AdaptationCommand, r.payload).target_seed_id) for r in result.commands]


def test_a_rewind_retires_the_commands_after_its_step(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    store.save(make_snapshot(10))
    store.journal_command(_germinate("a"), epoch=1, step=15)
    store.journal_command(_germinate("b"), epoch=2, step=25)
    store.journal_rewind(epoch=2, step=20, reason="fast rollback to e0002")
    assert _replayed(tmp_path) == [(15, "a")]  # 15 is before the rewind target: still this history's
    store.journal_rewind(epoch=1, step=10, reason="full rollback to ckpt-000000000010")
    assert _replayed(tmp_path) == []  # a MAJOR back to the checkpoint replays nothing after it
    store.journal_command(_germinate("c"), epoch=1, step=15)
    store.close()
    assert _replayed(tmp_path) == [(15, "c")]


def test_a_command_at_a_step_already_journaled_replaces_the_abandoned_ones(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    store.save(make_snapshot(10))
    store.journal_command(_germinate("a"), epoch=1, step=15)
    store.journal_command(_germinate("b"), epoch=2, step=25)
    store.journal_command(_germinate("c"), epoch=1, step=15)  # history went back before 15
    store.close()
    assert _replayed(tmp_path) == [(15, "c")]


def test_commands_journaled_after_a_later_checkpoint_only_are_replayed(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    store.save(make_snapshot(10))
    store.journal_command(_germinate("a"), epoch=1, step=20)  # applied at 20: the checkpoint of 20 holds it
    store.save(make_snapshot(20))
    store.journal_command(_germinate("b"), epoch=3, step=30)
    store.close()
    assert _replayed(tmp_path) == [(30, "b")]


def test_journaling_beside_the_async_writer_loses_and_tears_nothing(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=100, fsync=False)

    def journal() -> None:
        for i in range(200):
            store.journal_command(_germinate(f"slot{i}"), epoch=0, step=1000 + i)

    thread = threading.Thread(target=journal)
    thread.start()
    for step in range(10, 210, 10):
        store.save_async(make_snapshot(step))
    thread.join()
    store.close()
    replayed = replay(tmp_path)
    assert replayed.events == []
    commands = [r for r in replayed.records if r.type.name == "COMMAND"]
    assert [r.step for r in commands] == list(range(1000, 1200))
