"""What the ranks decide together under torchrun, so that no rank ever acts alone.

The rule: a decision that changes what a rank does next (which collective it enters, whether it
rolls back, escalates, freezes or stops) is made from every rank's vote, in one small all-gather,
before any rank acts on it. Each rank votes what it saw; the reduction is the same everywhere (the
worst level, any stop, any freeze), so every rank reaches the same verdict from the same numbers.

- Per step (`agree_step`, one all-gather of five integers): the step is finite, the worst incident
  level, whether an incident was a non-finite loss (the replay-with-checks decision follows it),
  a pending stop (SIGTERM or SIGINT on any rank; Ctrl-C wins, as its exit status does), and a
  watchdog freeze. A rank's own view changes between votes (a signal, the watchdog thread); only
  the verdict is acted on, so every rank stops, or resumes after a freeze, at the same step.
- Per boundary (`agree_boundary`, one all-gather): the state digest of the model (parameters and
  buffers, `distributed.state_digest`), the set of incident levels any rank's monitors raised
  (accuracy collapse, boundary timing), and a pending stop. Every rank then handles one incident
  per agreed level, worst first: its own if it has one, else a `peer_incident` of that level.
- A response's outcome (`EmergencyProtocol.handle(agree=...)`): a rollback that failed on any rank
  fails on all, so every rank escalates together.

What needs no vote, because every rank computes it from values that are already the same on every
rank: the checkpoint and snapshot cadence (the agreed position), early stopping (the run's history,
from validation of the same model on the same, unsharded, validation set), Tamiyo's command (rank
0's, broadcast), the breakers' and conservative mode's decisions (voted in the boundary's check
phase, `EpochBoundary.check`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from esper.tolaria.distributed import World, digests_match, leave, state_digest
from esper.tolaria.recovery.emergency import MAJOR, Incident
from esper.tolaria.state.position import StopRequest

STOP_CODES = {"SIGTERM": 1, "SIGINT": 2}  # the highest code wins: Ctrl-C's exit status beats a graceful stop
_OTHER_STOP = 3
_NAMES = {code: name for name, code in STOP_CODES.items()}


def stop_code(reason: str | None) -> int:
    if reason is None:
        return 0
    return STOP_CODES.get(reason, _OTHER_STOP)


def stop_reason(code: int) -> str | None:
    if code == 0:
        return None
    return _NAMES.get(code, "stop requested on another rank")


@dataclass(frozen=True)
class StepVerdict:
    finite: bool
    level: int  # the worst incident level any rank saw (0: none)
    loss_nonfinite: bool  # some rank's incident was a non-finite loss
    stop: str | None  # the stop every rank takes after this step, if any
    frozen: bool  # some rank's watchdog froze training: every rank resumes from the last healthy snapshot


def agree_step(world: World, *, finite: bool, incident: Incident | None, stop: str | None,
               frozen: bool) -> StepVerdict:
    rows = world.vote(0 if finite else 1, incident.level if incident is not None else 0,
                      1 if incident is not None and incident.kind == "loss_nonfinite" else 0,
                      stop_code(stop), 1 if frozen else 0)
    return StepVerdict(finite=all(r[0] == 0 for r in rows), level=max(r[1] for r in rows),
                       loss_nonfinite=any(r[2] for r in rows), stop=stop_reason(max(r[3] for r in rows)),
                       frozen=any(r[4] for r in rows))


@dataclass(frozen=True)
class BoundaryVerdict:
    levels: tuple[int, ...]  # every level some rank raised (or the digest forced), worst first
    diverged: bool  # the ranks' state digests differ
    stop: str | None


def agree_boundary(world: World, model: nn.Module, incidents: Sequence[Incident],
                   stop: str | None) -> BoundaryVerdict:
    mask = 0
    for incident in incidents:
        mask |= 1 << incident.level
    rows = world.vote(mask, stop_code(stop), prefix=state_digest(model, world.device))
    diverged = not digests_match(rows)
    agreed = 0
    for row in rows:
        agreed |= row[-2]
    if diverged:
        agreed |= 1 << MAJOR
    levels = tuple(level for level in range(agreed.bit_length() - 1, 0, -1) if agreed >> level & 1)
    return BoundaryVerdict(levels, diverged, stop_reason(max(r[-1] for r in rows)))


def boundary_incidents(verdict: BoundaryVerdict, local: Sequence[Incident], epoch: int,
                       step: int) -> list[Incident]:
    """One incident per agreed level, worst first, so every rank runs the same responses in the same
    order (each may enter collectives): this rank's own at that level, else the divergence (MAJOR),
    else a `peer_incident` standing for what another rank saw."""
    chosen = []
    for level in verdict.levels:
        own = next((i for i in local if i.level == level), None)
        if own is None and level == MAJOR and verdict.diverged:
            own = Incident(MAJOR, "rank_divergence", "state digests (parameters and buffers) differ across ranks",
                           epoch, step)
        chosen.append(own or peer_incident(level, epoch, step))
    return chosen


def peer_incident(level: int, epoch: int, step: int) -> Incident:
    return Incident(level, "peer_incident", "another rank saw an incident here", epoch, step)


@dataclass
class PendingStop(StopRequest):
    """Where SIGTERM and SIGINT land under torchrun: the request waits for the next vote, where every
    rank takes it at the same step (a rank that stopped alone would leave its peers inside a
    collective until the timeout).

    One exception: a rank told to stop that has completed no collective for `hung_after_s` is the
    stuck one (torchrun stops the others' group after a peer timed out on it). Its training thread
    will not reach a vote, and its peers have given up on it, so it leaves at once (`leave`), from
    the signal handler; its state is not checkpointed (rank 0's last committed checkpoint is the
    truth). A rank `with_peers` is not stuck, however long since its last sync: one waiting inside a
    collective serves the stop at the vote, and one whose collective failed is on its way out through
    `job`, flushing its checkpoint writes, which the signal must not cut."""

    rank: int = 0
    since_sync: Callable[[], float] = field(default=lambda: 0.0)
    hung_after_s: float = 0.0
    with_peers: Callable[[], bool] = field(default=lambda: False)

    def request(self, reason: str) -> None:
        stalled = self.since_sync()
        if self.hung_after_s and stalled >= self.hung_after_s and not self.with_peers():
            leave(f"tolaria: rank {self.rank}: {reason} after {stalled:.0f} s out of step with its peers "
                  f"(hung; they timed out on it): leaving; the job continues from rank 0's last committed "
                  f"checkpoint")
        super().request(reason)
