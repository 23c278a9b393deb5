"""Two real gloo ranks, spawned in-process: the step averages gradients before the aggregator reads
them (clipping and the gradient norm are the global batch's, as in one process), every rank reduces
the same layout whatever branch its batch used, and buffers agree at a boundary."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from esper.tolaria.control.aggregation import AggregationConfig, GradientAggregator
from esper.tolaria.distributed import World, state_digest
from esper.tolaria.loop.precision import Precision
from esper.tolaria.loop.step import StepCompute
from esper.tolaria.observe.profiling import Profiler
from esper.tolaria.tasks import ClassificationTask

MAX_NORM = 0.05  # far below the digits-like gradient norms here: every step clips
SPLIT = 7  # rank 0 takes the first 7 rows of each 13-row global batch, rank 1 the other 6 (uneven)
STEPS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(13, 4, generator=g), torch.randint(0, 3, (13,), generator=g)) for _ in range(STEPS)]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def train_clipped(world: World, rank: int | None) -> dict[str, Any]:
    """STEPS SGD steps with clipping on; `rank` None is one process on the whole global batch."""
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    aggregator = GradientAggregator(AggregationConfig(max_grad_norm=MAX_NORM))
    compute = StepCompute(model=model, task=ClassificationTask(), kasmina=None,  # type: ignore[arg-type]
                          aggregator=aggregator, precision=Precision("fp32", torch.device("cpu")),
                          morphogenesis=False, profiler=Profiler(False), optimizer=lambda: optimizer,
                          reduce=world.reduce_gradients if world.distributed else None)
    params = dict(model.named_parameters())
    norms = []
    for x, y in _global_batches():
        shard = slice(None) if rank is None else (slice(0, SPLIT) if rank == 0 else slice(SPLIT, None))
        result = compute.run([(x[shard], y[shard])], params, ClassificationTask().loss, check_grads=False)
        norms.append(result.stats.grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"norms": norms, "state": {k: v.tolist() for k, v in model.state_dict().items()}}


class Branches(nn.Module):
    """A shared trunk and three branches: a batch uses one; `c` is used by no rank."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 4)
        self.a, self.b, self.c = nn.Linear(4, 2), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        return getattr(self, branch)(self.trunk(x))  # type: ignore[no-any-return]


def branches_differ_per_rank(world: World, rank: int) -> dict[str, Any]:
    model = Branches()
    x, y = _global_batches()[0]
    rows = SPLIT if rank == 0 else 13 - SPLIT
    local = x[:rows] if rank == 0 else x[SPLIT:]
    nn.functional.cross_entropy(model(local, "a" if rank == 0 else "b"), y[:rows] % 2).backward()
    own = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    world.reduce_gradients(list(model.parameters()), rows)
    grads = {n: None if p.grad is None else p.grad.tolist() for n, p in model.named_parameters()}
    expected = {n: (g * rows / 13).tolist() for n, g in own.items() if not n.startswith("trunk")}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return {"grads": grads, "expected_own_branch": expected, "match": world.parameters_match(model)}


def buffers_agree_at_a_boundary(world: World, rank: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    for x, _ in _global_batches():
        model(x[:SPLIT] if rank == 0 else x[SPLIT:] * 3 + 1)  # different data: different running statistics
    before = {"match": world.parameters_match(model), "mean": model[1].running_mean.tolist()}
    world.sync_buffers(model)
    return {"before": before, "after": world.parameters_match(model), "mean": model[1].running_mean.tolist(),
            "count": int(model[1].num_batches_tracked), "digest": state_digest(model).tolist()}


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    world = World.from_env("cpu")
    try:
        seen = {"clipped": train_clipped(world, rank), "branches": branches_differ_per_rank(world, rank),
                "buffers": buffers_agree_at_a_boundary(world, rank)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        world.close()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_rank_main, args=(_free_port(), str(out)), nprocs=2, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_ranks_with_clipping_on_equal_one_process_on_the_same_global_batches(
        ranks: list[dict[str, Any]]) -> None:
    one = train_clipped(World(), None)
    assert all(n > MAX_NORM * 4 for n in one["norms"]), one["norms"]  # clipping changes every step
    for seen in ranks:
        # The ranks report the global gradient's norm (what one process clips by), not their shard's.
        torch.testing.assert_close(torch.tensor(seen["clipped"]["norms"]), torch.tensor(one["norms"]),
                                   rtol=1e-5, atol=0)
        for name, value in one["state"].items():
            # fp32 tolerance, not bits: each rank's GEMM sums its own rows, then the shards are added
            # (weighted by rows) and divided by 13: not one process's summation order.
            torch.testing.assert_close(torch.tensor(seen["clipped"]["state"][name]), torch.tensor(value),
                                       rtol=1e-5, atol=1e-6, msg=name)
    assert ranks[0]["clipped"]["state"] == ranks[1]["clipped"]["state"]  # bit-equal across ranks


def test_a_branch_used_by_one_rank_is_zero_filled_on_the_other_and_an_unused_one_stays_none(
        ranks: list[dict[str, Any]]) -> None:
    zero, one = (seen["branches"] for seen in ranks)
    assert zero["grads"] == one["grads"] and zero["match"] and one["match"]
    grads = zero["grads"]
    assert grads["c.weight"] is None and grads["c.bias"] is None  # no rank's batch reached it
    assert all(grads[n] is not None for n in ("trunk.weight", "a.weight", "a.bias", "b.weight", "b.bias"))
    for seen in (zero, one):  # a branch's average is its one rank's gradient, weighted by that rank's rows
        for name, expected in seen["expected_own_branch"].items():
            torch.testing.assert_close(torch.tensor(grads[name]), torch.tensor(expected), msg=name)


def test_batchnorm_statistics_are_averaged_so_the_ranks_digests_agree(ranks: list[dict[str, Any]]) -> None:
    zero, one = (seen["buffers"] for seen in ranks)
    assert zero["before"]["match"] is False  # different data, different running statistics
    assert zero["after"] is True and one["after"] is True and zero["digest"] == one["digest"]
    mean = (torch.tensor(zero["before"]["mean"]) + torch.tensor(one["before"]["mean"])) / 2
    assert torch.equal(torch.tensor(zero["mean"]), mean)
    assert zero["count"] == STEPS
