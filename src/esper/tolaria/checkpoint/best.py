"""Best checkpoints (`checkpoint.keep_best`): which committed checkpoints are kept for their score.

A checkpoint written at an epoch boundary may carry a `BestScore`: the watched validation metric
of the epoch just finished, its direction, and how many best checkpoints the run keeps. The score
travels in the checkpoint's WAL COMMIT payload, so it is durable exactly when the checkpoint is,
and it is read back with every COMMIT (a resumed store, `tolaria inspect`, `resume --from best`).

Ranking, used alike by retention (the writer) and by every reader: the candidates are the present
committed checkpoints scored for the metric and direction of the newest scored one; better value
first, and on a tie the earlier transaction (the first checkpoint to reach a value keeps it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

BEST = "best"  # what `tolaria resume --from` accepts for the best kept checkpoint
_MODES = ("max", "min")
MAX_METRIC_CHARS = 64


@dataclass(frozen=True)
class BestScore:
    """The watched metric of the epoch a boundary checkpoint follows.

    `epoch` is that epoch, numbered from 0 as the console numbers it (the checkpoint itself resumes
    at `epoch + 1`); `top_k` is how many best checkpoints the run keeps."""

    metric: str
    mode: str
    value: float
    epoch: int
    top_k: int

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"BestScore.mode = {self.mode!r}: use 'max' or 'min'")
        if self.top_k < 1:
            raise ValueError(f"BestScore.top_k = {self.top_k}: keep at least 1 best checkpoint")

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "value": self.value, "epoch": self.epoch,
                "top_k": self.top_k}


def score_from_dict(data: Any) -> BestScore | None:
    """The score a COMMIT payload carries, or None when it is absent or not well formed (a COMMIT is
    only CRC-protected: a malformed score makes its checkpoint an ordinary one, never an error)."""
    if not isinstance(data, Mapping):
        return None
    metric, mode, value, epoch, top_k = (data.get(k) for k in ("metric", "mode", "value", "epoch", "top_k"))
    well_formed = (isinstance(metric, str) and 0 < len(metric) <= MAX_METRIC_CHARS and mode in _MODES
                   and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
                   and _is_count(epoch, 0) and _is_count(top_k, 1))
    return BestScore(metric, mode, float(value), epoch, top_k) if well_formed else None  # type: ignore[arg-type]


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


class Scored(Protocol):
    @property
    def txn_id(self) -> int: ...

    @property
    def best(self) -> BestScore | None: ...


S = TypeVar("S", bound=Scored)


def ranked_best(checkpoints: Iterable[S], top_k: int | None = None) -> list[S]:
    """The checkpoints kept as best, best first: at most `top_k` (default: the newest score's own
    `top_k`) of those scored like the newest scored one (same metric and direction)."""
    scored = [(c, c.best) for c in checkpoints if c.best is not None]
    if not scored:
        return []
    newest = max(scored, key=lambda pair: pair[0].txn_id)[1]
    sign = 1.0 if newest.mode == "max" else -1.0
    same = [(c, b) for c, b in scored if (b.metric, b.mode) == (newest.metric, newest.mode)]
    same.sort(key=lambda pair: (-sign * pair[1].value, pair[0].txn_id))
    return [c for c, _ in same[: newest.top_k if top_k is None else top_k]]
