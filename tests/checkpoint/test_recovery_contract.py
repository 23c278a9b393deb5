"""What recovery hands back, exactly: the snapshot a loaded checkpoint becomes (what the snapshot
cache and a rollback then trust), and which journaled commands a rewind to a command's own step keeps."""

from __future__ import annotations

from pathlib import Path

from ckpt_helpers import assert_state_equal, make_snapshot, make_state

from esper.leyline import SEED_OP_GERMINATE, AdaptationCommand, parse, seed_command
from esper.tolaria.checkpoint import CheckpointStore, recover


def test_a_loaded_checkpoint_becomes_a_healthy_snapshot_of_its_own_step_state_and_size(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    store.save(make_snapshot(10, epoch=1))
    info = store.save(make_snapshot(20, epoch=2))
    store.close()
    loaded = recover(tmp_path).checkpoint
    assert loaded is not None
    snap = loaded.snapshot()
    assert (snap.snapshot_id, snap.epoch, snap.global_step, snap.healthy) == (info.name, 2, 20, True)
    assert snap.state is loaded.state
    expected = make_state(20)
    for section in ("model", "optimizer", "trainer"):
        assert_state_equal(snap.state[section], expected[section])
    assert snap.nbytes == sum(f.size_bytes for f in loaded.manifest.files) > 0


def test_a_rewind_to_a_commands_own_step_keeps_that_command(tmp_path: Path) -> None:
    def germinate(slot: str) -> AdaptationCommand:
        return seed_command(SEED_OP_GERMINATE, issued_by="test", target_seed_id=slot, blueprint_id="mlp")

    store = CheckpointStore(tmp_path, fsync=False)
    store.save(make_snapshot(10))
    store.journal_command(germinate("a"), epoch=1, step=15)
    store.journal_command(germinate("b"), epoch=1, step=18)
    store.journal_rewind(epoch=1, step=15, reason="fast rollback to the snapshot taken after a's apply")
    store.close()
    replayed = recover(tmp_path, clean=False).commands
    assert [(r.step, parse(AdaptationCommand, r.payload).target_seed_id) for r in replayed] == [(15, "a")]
