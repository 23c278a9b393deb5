"""`World` on the collectives' device: ranks bind their GPU before NCCL exists, the per-step and
boundary agreements build their tensors there, and `parameters_match` compares a digest of every
parameter's and buffer's raw bits (two real gloo ranks on the CPU; NCCL on two GPUs)."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from esper.tolaria.distributed import World, state_digest


class Net(nn.Module):
    """Parameters of two dtypes and BatchNorm buffers (float statistics, an int64 batch count)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3)
        self.norm = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 2).to(torch.bfloat16)
        self.norm.running_mean.uniform_(-1, 1)
        self.register_buffer("mask", torch.tensor([True, False, True]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _next_ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, math.inf))


def _rank_main(rank: int, port: int, out: str, backend: str) -> None:
    """One rank: join through the torchrun environment, run every collective, write what it saw."""
    import os

    os.environ.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    world = World.from_env("cuda" if backend == "nccl" else "cpu")
    try:
        net = Net().to(world.device)
        seen: dict[str, Any] = {"backend": world.backend, "device": str(world.device),
                                "current_cuda": torch.cuda.current_device() if backend == "nccl" else None}
        seen["equal"] = world.parameters_match(net)
        with torch.no_grad():
            net.conv.weight[0, 0, 0, 0] = 0.0 if rank == 0 else -0.0  # equal as floats, not as bits
        seen["signed_zero"] = world.parameters_match(net)
        with torch.no_grad():
            net.conv.weight[0, 0, 0, 0] = math.nan  # the same NaN on both: the same state
        seen["same_nan"] = world.parameters_match(net)
        if rank == 1:
            net.norm.running_var[1] = _next_ulp(net.norm.running_var[1])
        seen["ulp_in_buffer"] = world.parameters_match(net)
        seen["step"] = world.agree_step(rank == 0, 3 * rank, 5 + rank)
        seen["flag"] = [world.agree_flag(rank == 1), world.agree_flag(False)]
        seen["broadcast"] = world.broadcast_object({"from": rank})
        seen["gathered"] = world.gather_objects(f"r{rank}")
        world.barrier()
        Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        world.close()


def _two_ranks(tmp_path: Path, backend: str) -> list[dict[str, Any]]:
    mp.start_processes(_rank_main, args=(_free_port(), str(tmp_path), backend), nprocs=2, start_method="spawn")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def _check_two_ranks(seen: list[dict[str, Any]]) -> None:
    for s in seen:
        assert s["equal"] is True and s["signed_zero"] is False, s
        assert s["same_nan"] is True, s
        assert s["ulp_in_buffer"] is False, s  # one ulp of a BatchNorm statistic on rank 1 only
        assert s["step"] == [False, 3, 11] and s["flag"] == [True, False], s
        assert s["broadcast"] == {"from": 0} and s["gathered"] == ["r0", "r1"], s


def test_two_gloo_ranks_agree_on_cpu_and_the_digest_catches_one_ulp_in_a_buffer(tmp_path: Path) -> None:
    seen = _two_ranks(tmp_path, "gloo")
    assert [(s["backend"], s["device"]) for s in seen] == [("gloo", "cpu")] * 2
    _check_two_ranks(seen)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: two GPUs")
def test_two_nccl_ranks_bind_their_own_gpu_and_agree_there(tmp_path: Path) -> None:
    seen = _two_ranks(tmp_path, "nccl")
    assert [(s["backend"], s["device"], s["current_cuda"]) for s in seen] == \
        [("nccl", "cuda:0", 0), ("nccl", "cuda:1", 1)]
    _check_two_ranks(seen)


def test_under_nccl_a_rank_binds_its_local_gpu_before_the_group_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda **kw: calls.append(("init", {k: str(v) for k, v in kw.items()})))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    world = World.from_env()
    assert calls == [("set_device", "cuda:1"), ("init", {"backend": "nccl", "device_id": "cuda:1"})]
    assert (world.backend, world.device) == ("nccl", torch.device("cuda", 1))
    calls.clear()
    cpu_run = World.from_env("cpu")  # CUDA present but the run trains on the CPU: gloo, no GPU bound
    assert calls == [("init", {"backend": "gloo"})] and cpu_run.device == torch.device("cpu")


def test_one_process_runs_no_collective_and_lives_on_the_cpu() -> None:
    world = World()
    assert world.device == torch.device("cpu") and world.parameters_match(Net())
    assert world.agree_step(False, 2, 7) == (False, 2, 7) and world.gather_objects("x") == ["x"]


# ---------------------------------------------------------------- the digest itself
def _raw_words(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s storage as integers of its own element size (a view: writing it writes the tensor)."""
    flat = tensor.data.view(-1)
    flat = flat.view(torch.uint8) if flat.dtype == torch.bool else flat
    return flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])


def test_every_single_bit_flip_in_any_parameter_or_buffer_changes_the_digest() -> None:
    net = Net()
    base = state_digest(net)
    flipped = 0
    for tensor in [*net.parameters(), *net.buffers()]:
        raw = _raw_words(tensor)
        bits = 1 if tensor.dtype == torch.bool else raw.element_size() * 8  # a bool holds one valid bit
        for index in {0, raw.numel() - 1}:
            old = raw[index].clone()
            for bit in range(bits):
                mask = -(1 << bit) if bit == raw.element_size() * 8 - 1 else 1 << bit  # the sign bit
                raw[index] = old ^ torch.tensor(mask, dtype=raw.dtype)
                assert not torch.equal(state_digest(net), base), (tensor.shape, index, bit)
                flipped += 1
            raw[index] = old
    assert torch.equal(state_digest(net), base) and flipped > 300


def test_the_digest_sees_structure_and_order_not_only_values() -> None:
    a, b = Net(), Net()
    assert torch.equal(state_digest(a), state_digest(b))
    b.extra = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        b.extra.weight.zero_()  # all-zero bits: only the count and the sizes tell it apart
    assert not torch.equal(state_digest(a), state_digest(b))
    c = Net()
    with torch.no_grad():  # two tensors' contents swapped, every value kept
        w, v = c.norm.weight.clone(), c.norm.bias.clone()
        c.norm.weight.copy_(v)
        c.norm.bias.copy_(w)
    assert not torch.equal(state_digest(a), state_digest(c))


def test_the_digest_is_computed_where_the_model_lives_without_reading_it() -> None:
    # A meta tensor has no data: any host read or copy of it raises, so this shows the digest is
    # built from device-side reductions only.
    meta = Net().to("meta")
    out = state_digest(meta)
    assert out.device.type == "meta" and out.shape == (4,) and out.dtype == torch.int64


@pytest.mark.gpu
def test_on_cuda_the_digest_equals_the_cpu_one_and_never_synchronises() -> None:
    net = Net()
    expected = state_digest(net)
    on_gpu = Net().cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        digest = state_digest(on_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert digest.device.type == "cuda" and torch.equal(digest.cpu(), expected)  # integers: exact on both
