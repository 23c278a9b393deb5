"""The pieces of the ranks' agreement, without a process group: how votes become incidents, how a
response's outcome is agreed, where a signal lands, how a failed collective is reported, and which
rank drills a plan keeps."""

from __future__ import annotations

import time
from typing import Any

import pytest

from esper.tolaria.distributed import PeerLost, SyncClock, World
from esper.tolaria.drills import DrillError, FaultPlan
from esper.tolaria.recovery import agreement
from esper.tolaria.recovery.emergency import CRITICAL, MAJOR, MINOR, SEVERE, ActionResult, EmergencyProtocol, Incident


def _ok(name: str) -> Any:
    def handler(incident: Incident) -> ActionResult:
        return ActionResult(True, name)
    return handler


def test_a_response_that_failed_on_another_rank_escalates_here_too() -> None:
    protocol = EmergencyProtocol({MINOR: _ok("log"), MAJOR: _ok("full"), SEVERE: _ok("fast"), CRITICAL: _ok("halt")})
    asked: list[bool] = []

    def peer_failed_first(ok: bool) -> bool:  # the vote: rank 1's fast rollback failed, its full one worked
        asked.append(ok)
        return len(asked) > 1

    record = protocol.handle(Incident(SEVERE, "loss_spike", "spike", 1, 10), agree=peer_failed_first)
    assert asked == [True, True]  # asked after every level's handler, also when this rank succeeded
    first, last = protocol.records
    assert not first.ok and first.detail.endswith("failed on another rank") and first.escalated_to == MAJOR
    assert last is record and record.level == MAJOR and record.ok


def test_without_a_vote_the_protocol_decides_alone() -> None:
    protocol = EmergencyProtocol({MINOR: _ok("log"), MAJOR: _ok("full"), SEVERE: _ok("fast"), CRITICAL: _ok("halt")})
    assert protocol.handle(Incident(SEVERE, "loss_spike", "spike", 1, 10)).ok and len(protocol.records) == 1


def test_every_rank_handles_one_incident_per_agreed_level_worst_first() -> None:
    timing = Incident(MINOR, "boundary_slow", "slow", 3, 30)
    verdict = agreement.BoundaryVerdict(levels=(MAJOR, MINOR), diverged=True, stop=None)
    assert [(i.level, i.kind) for i in agreement.boundary_incidents(verdict, [timing], 3, 30)] == \
        [(MAJOR, "rank_divergence"), (MINOR, "boundary_slow")]
    collapse = Incident(MAJOR, "accuracy_collapse", "fell", 3, 30)
    peer = agreement.BoundaryVerdict(levels=(MAJOR, MINOR), diverged=False, stop=None)
    assert [(i.level, i.kind) for i in agreement.boundary_incidents(peer, [collapse], 3, 30)] == \
        [(MAJOR, "accuracy_collapse"), (MINOR, "peer_incident")]


def test_one_process_votes_its_own_view() -> None:
    world = World()
    verdict = agreement.agree_step(world, finite=False, incident=Incident(SEVERE, "loss_nonfinite", "nan", 0, 4),
                                   stop="SIGINT", frozen=False)
    assert verdict == agreement.StepVerdict(finite=False, level=SEVERE, loss_nonfinite=True, stop="SIGINT",
                                            frozen=False)
    assert world.agree_any(True, False) == (True, False)


def test_stop_codes_round_trip_and_ctrl_c_wins() -> None:
    codes = [agreement.stop_code(r) for r in (None, "SIGTERM", "SIGINT")]
    assert codes == [0, 1, 2] and agreement.stop_reason(max(codes)) == "SIGINT"
    assert agreement.stop_reason(agreement.stop_code("halted: x")) == "stop requested on another rank"


def test_a_signal_on_a_rank_in_step_with_its_peers_waits_for_the_vote(monkeypatch: pytest.MonkeyPatch) -> None:
    left: list[str] = []
    monkeypatch.setattr(agreement, "leave", left.append)
    stop = agreement.PendingStop(rank=1, since_sync=lambda: 0.2, hung_after_s=5.0)
    stop.request("SIGTERM")
    assert stop.reason == "SIGTERM" and left == []


def test_a_signal_on_a_rank_out_of_step_for_half_the_timeout_leaves_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    left: list[str] = []
    monkeypatch.setattr(agreement, "leave", left.append)
    agreement.PendingStop(rank=1, since_sync=lambda: 6.0, hung_after_s=5.0).request("SIGTERM")
    [message] = left
    assert message.startswith("tolaria: rank 1: SIGTERM after 6 s out of step") and "rank 0's last committed" in message


def test_a_signal_on_a_rank_already_leaving_after_a_failed_collective_waits_for_its_flush(
        monkeypatch: pytest.MonkeyPatch) -> None:
    left: list[str] = []
    monkeypatch.setattr(agreement, "leave", left.append)
    stop = agreement.PendingStop(rank=0, since_sync=lambda: 11.0, hung_after_s=5.0, with_peers=lambda: True)
    stop.request("SIGTERM")  # it waited out the timeout on a hung peer: out of step, but not the stuck one
    assert left == [] and stop.reason == "SIGTERM"


def test_a_signal_handled_as_a_long_collective_returns_does_not_take_the_waiting_rank_for_the_hung_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    left: list[str] = []
    monkeypatch.setattr(agreement, "leave", left.append)
    world = World(rank=1, size=2, backend="gloo", timeout_s=10.0, sync=SyncClock(at=time.monotonic() - 8))
    stop = agreement.PendingStop(rank=1, since_sync=world.sync.since, hung_after_s=5.0,
                                 with_peers=world.sync.with_peers)
    with world._collective("barrier"):  # rank 0 took 8 s to reach it; the SIGTERM's handler runs here
        stop.request("SIGTERM")
    assert left == [] and stop.reason == "SIGTERM"
    assert not world.sync.inside and world.sync.since() < 5


def test_a_failed_collective_is_a_lost_peer_naming_the_limit_and_a_good_one_is_a_sync() -> None:
    world = World(rank=1, size=2, backend="gloo", timeout_s=10.0, sync=SyncClock(at=time.monotonic() - 100))
    with pytest.raises(PeerLost, match=r"^gradient all-reduce failed on rank 1 of 2 \(limit 10 s\): Timed out"):
        with world._collective("gradient all-reduce"):
            raise RuntimeError("[gloo/unbound_buffer.cc:78]\nTimed out waiting 10000ms for recv operation")
    assert world.sync.since() > 99 and world.sync.lost  # a failure is not a sync: this rank is leaving
    with world._collective("vote"):
        pass
    assert world.sync.since() < 5


def test_rank_hang_needs_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(DrillError, match="rank-hang needs torchrun"):
        FaultPlan.parse(["rank-hang@epoch=1,rank=1"])


def test_rank_faults_fire_in_the_first_attempt_only_and_on_their_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    specs = ["rank-hang@epoch=1,step=2,rank=1", "rank-kill@epoch=2,rank=0", "nan-loss@epoch=3,step=1,rank=1"]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert [d.kind for d in FaultPlan.parse(specs, rank=1).drills] == ["rank-hang", "nan-loss"]
    assert [d.kind for d in FaultPlan.parse(specs, rank=0).drills] == ["rank-kill"]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert [d.kind for d in FaultPlan.parse(specs, rank=1).drills] == ["nan-loss"]


def test_a_drill_on_a_rank_the_job_does_not_have_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DrillError, match=r"rank=2, but this job has 2 process\(es\) \(ranks 0-1\): name one"):
        FaultPlan.parse(["rank-kill@epoch=1,step=3,rank=2"], rank=0)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(DrillError, match=r"rank=1, but this job has 1 process\(es\) \(rank 0\)"):
        FaultPlan.parse(["nan-loss@epoch=1,rank=1"])
    assert FaultPlan.parse(["nan-loss@epoch=1,rank=0"]).drills[0].rank == 0
