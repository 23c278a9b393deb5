"""Journaled adaptation commands (issue item 12): a crash between a command's apply and the next
checkpoint resumes into the same architecture as the uninterrupted run, because the journaled
command is replayed at the boundary where it was first applied, whatever Tamiyo says then."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainer_fixtures import small_config  # type: ignore[import-not-found]

from esper.leyline import SEED_OP_GERMINATE, AdaptationCommand, SystemStatePacket, noop_command, parse
from esper.tamiyo import HeuristicTamiyo, TamiyoConfig
from esper.tolaria.checkpoint import recover
from esper.tolaria.checkpoint.wal import RecordType, replay

CALM = {"boundary": {"state_assembly_ms": 1e4, "tamiyo_ms": 1e4, "apply_ms": 1e4, "check_ms": 1e4,
                     "total_ms": 1e5}, "handshake": {"tamiyo_timeout_s": 30.0}}


class Crash(Exception):
    """Stands in for the process dying."""


class ColdStartTamiyo:
    """A Tamiyo that, after a restart, is consulted as usual but answers no-op for its first
    `silent` boundaries (a remote controller still warming up): only the journal can then
    reproduce what the interrupted run applied."""

    def __init__(self, config: Any, silent: int) -> None:
        self.inner = HeuristicTamiyo(TamiyoConfig.model_validate(config.tamiyo))
        self.silent = silent

    def evaluate_epoch(self, packet: SystemStatePacket) -> AdaptationCommand:
        command = self.inner.evaluate_epoch(packet)  # its own state evolves as in the uninterrupted run
        if self.silent > 0:
            self.silent -= 1
            return noop_command(issued_by="cold-tamiyo", reason="warming up")
        return command

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.inner.load_state_dict(state)


class Durable:
    """Each epoch's checkpoint is committed before the next epoch starts (the crash point is exact)."""

    def on_boundary_end(self, t: Any, epoch: int, report: Any) -> None:
        assert t.checkpoints.store.flush(timeout=60)


def _seeds(t: Any) -> list[tuple[str, int]]:
    return [(s.seed_id, s.stage) for s in t.kasmina.export_seed_states()]


def _first_germination_epoch(run_dir: Path) -> int:
    for rec in replay(run_dir / "checkpoints").records:
        if rec.type == RecordType.COMMAND and \
                parse(AdaptationCommand, rec.payload).seed_operation.operation == SEED_OP_GERMINATE:
            return rec.epoch
    raise AssertionError("the reference run never germinated")


def test_a_crash_after_a_germinate_apply_resumes_into_the_same_architecture(
    make_trainer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = small_config(**CALM, run={"epochs": 6}, checkpoint={"enabled": True, "keep_last": 100})
    reference, _ = make_trainer(config, run_dir=tmp_path / "ref")
    reference.callbacks.append(Durable())
    final = reference.fit().summary["final_state_sha256"]
    reference_seeds = _seeds(reference)
    reference.close()
    germinated_at = _first_germination_epoch(tmp_path / "ref")

    victim, _ = make_trainer(config, run_dir=tmp_path / "victim")
    victim.callbacks.append(Durable())
    real_boundary = victim.safety.boundary

    def crash_before_the_checkpoint(epoch: int, *args: Any) -> None:
        if epoch == germinated_at:  # the command is applied (and journaled); its checkpoint is not taken
            raise Crash(f"killed after the apply of epoch {epoch}")
        real_boundary(epoch, *args)

    monkeypatch.setattr(victim.safety, "boundary", crash_before_the_checkpoint)
    with pytest.raises(Crash):
        victim.fit()
    victim.close()
    pending = recover(tmp_path / "victim" / "checkpoints", clean=False)
    assert pending.checkpoint is not None and pending.checkpoint.epoch == germinated_at  # the one before
    assert [r.epoch for r in pending.commands] == [germinated_at]

    resumed, bus = make_trainer(config, run_dir=tmp_path / "victim", tamiyo=ColdStartTamiyo(config, silent=1))
    resumed.resume_from(tmp_path / "victim" / "checkpoints")
    summary = resumed.fit().summary
    assert _seeds(resumed) == reference_seeds
    assert summary["final_state_sha256"] == final
    assert "journal_replay_differs" in bus.events()  # Tamiyo said no-op; the journal applied the germinate
    resumed.close()


def test_a_major_full_rollback_retires_the_commands_applied_after_its_target(
    make_trainer: Any, tmp_path: Path
) -> None:
    from esper.tolaria.checkpoint.recovery import journaled_commands
    from esper.tolaria.drills import FaultPlan

    config = small_config(**CALM, run={"epochs": 6}, checkpoint={"enabled": True, "keep_last": 100})
    probe, _ = make_trainer(config, run_dir=tmp_path / "probe")
    probe.callbacks.append(Durable())
    probe.fit()
    probe.close()
    germinated_at = _first_germination_epoch(tmp_path / "probe")

    # the accuracy collapse at the germination epoch comes after the apply: the MAJOR response
    # restores a state from before it, so the germinate journaled there belongs to an abandoned history
    faults = FaultPlan.parse([f"accuracy-collapse@epoch={germinated_at}"])
    run, _ = make_trainer(config, run_dir=tmp_path / "run", faults=faults)
    run.callbacks.append(Durable())
    run.fit()
    run.close()
    done = [r for r in run.log.rollbacks if r.succeeded]
    assert len(done) == 1  # whichever tier the MAJOR response used
    target_step = done[0].target_step
    records = replay(tmp_path / "run" / "checkpoints").records
    first = next(r for r in records if r.type == RecordType.COMMAND)
    rewinds = [r for r in records if r.type == RecordType.REWIND]
    assert [r.step for r in rewinds] == [target_step] and first.step > target_step
    assert rewinds[0].offset > first.offset or rewinds[0].segment > first.segment
    assert first not in journaled_commands(records, target_step)  # never replayed by a resume
