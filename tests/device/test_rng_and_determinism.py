"""Random state and deterministic mode around CUDA: a snapshot's RNG state without CUDA (none read,
none needed to restore, a CUDA run's states skipped), CUDA's generators once CUDA is in use (a
dropout draw resumes exactly), and `CUBLAS_WORKSPACE_CONFIG` set before cuBLAS reads it."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from esper.tolaria.config import TolariaConfig
from esper.tolaria.loop.build import CUBLAS_WORKSPACE, configure_torch
from esper.tolaria.state.rng import rng_state, set_rng_state


def draws(generator: torch.Generator) -> tuple[list[float], list[float], float, list[float]]:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random(),
            torch.rand(3, generator=generator).tolist())


def test_without_cuda_a_snapshot_reads_no_cuda_state_and_restores_every_other_exactly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("read CUDA state without CUDA"))
    generator = torch.Generator().manual_seed(7)
    state = rng_state(generator)
    assert state["cuda"] == [] and "loader" in state
    first = draws(generator)
    set_rng_state(state, generator)
    assert draws(generator) == first


def test_a_cuda_runs_states_restore_on_a_machine_without_cuda_as_the_rest_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a: pytest.fail("wrote CUDA state without CUDA"))
    generator = torch.Generator().manual_seed(3)
    state = {**rng_state(generator), "cuda": [torch.zeros(16, dtype=torch.uint8)]}  # as a GPU run saved it
    first = draws(generator)
    set_rng_state(state, generator)
    assert draws(generator) == first


def test_once_cuda_is_in_use_every_devices_generator_is_captured_and_put_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    saved = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    written: list[tuple[int, list[int]]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in saved])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: written.append((d, s.tolist())))
    state = rng_state()
    assert [s.tolist() for s in state["cuda"]] == [s.tolist() for s in saved]
    set_rng_state(state)
    assert written == [(0, saved[0].tolist()), (1, saved[1].tolist())]


def test_before_cuda_is_initialised_nothing_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Reading would initialise CUDA (a context on a GPU) for a run that never uses it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("initialised CUDA to read it"))
    assert rng_state()["cuda"] == []


@pytest.mark.gpu
def test_a_cuda_dropout_draw_resumes_exactly() -> None:
    torch.manual_seed(11)
    x = torch.ones(4096, device="cuda")
    torch.nn.functional.dropout(x, 0.5)  # CUDA in use, generator advanced
    state = rng_state()
    assert state["cuda"] and all(s.device.type == "cpu" for s in state["cuda"])  # snapshot-ready host bytes
    first = [torch.nn.functional.dropout(x, 0.5) for _ in range(3)]
    torch.nn.functional.dropout(x, 0.5)  # the run moves on
    set_rng_state(state)
    again = [torch.nn.functional.dropout(x, 0.5) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


# ---------------------------------------------------------------- deterministic mode
@pytest.fixture()
def restore_determinism() -> Iterator[None]:
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    yield None
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.benchmark = flags[2]


def run_config(deterministic: bool) -> TolariaConfig:
    return TolariaConfig.model_validate({"run": {"deterministic": deterministic}})


@pytest.mark.usefixtures("restore_determinism")
def test_a_deterministic_run_sets_the_cublas_workspace_when_unset_and_says_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    with caplog.at_level(logging.INFO, logger="esper.tolaria.loop.build"):
        configure_torch(run_config(True))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in caplog.text


@pytest.mark.usefixtures("restore_determinism")
def test_the_users_cublas_setting_is_kept_and_a_free_run_sets_nothing(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with caplog.at_level(logging.INFO, logger="esper.tolaria.loop.build"):
        configure_torch(run_config(True))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8" and "set by the environment" in caplog.text
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    configure_torch(run_config(False))
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
