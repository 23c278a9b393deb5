"""torch.compile (inductor) of the host on CUDA: the compiled forward matches the eager one, a
germinated seed is in it, and the structure change compiles at most once; `run.compile = true`
trains a job whose checkpoints keep the uncompiled parameter names."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch._dynamo.utils import counters

from esper.kasmina import KasminaLayer
from esper.leyline import SEED_OP_GERMINATE, seed_command
from esper.tolaria.loop.build import build_trainer
from esper.tolaria.loop.compile import compile_host
from esper.tolaria.models import HostMLP
from gpu.jobs import cuda_config

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch.compiler.reset()
    counters.clear()
    yield
    torch.compiler.reset()


def test_a_germination_recompiles_the_compiled_host_at_most_once() -> None:
    torch.manual_seed(0)
    model = HostMLP(32, [64, 64], 10).cuda()
    kasmina = KasminaLayer(model, ["stem", "body.1"], example_input=torch.zeros(2, 32, device="cuda"))
    compiled = compile_host(model, True)
    assert compiled is not None and compiled.backend == "inductor"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def steps(n: int) -> None:
        for _ in range(n):
            x = torch.randn(16, 32, device="cuda", generator=gen)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    steps(4)
    warm = int(counters["frames"]["ok"])
    result = kasmina.apply_command(seed_command(SEED_OP_GERMINATE, issued_by="test", target_seed_id="body.1"))
    assert result.ok, result.reason
    compiled.structure_changed()
    steps(6)
    assert int(counters["frames"]["ok"]) - warm <= 1
    x = torch.randn(16, 32, device="cuda", generator=gen)
    torch.testing.assert_close(model(x), model._call_impl(x), rtol=1e-4, atol=1e-5)


def test_run_compile_trains_a_job_on_cuda_with_portable_checkpoint_names() -> None:
    trainer = build_trainer(cuda_config(run={"epochs": 3, "compile": True}))
    eager_names = [n for n in trainer.model.state_dict()]
    result = trainer.fit()
    assert trainer.model._compiled_call_impl is not None, "run.compile = true left the host uncompiled"
    assert all(not n.startswith("_orig_mod.") for n in trainer.model.state_dict())
    assert set(eager_names) <= set(trainer.model.state_dict())  # a grown host adds seeds' names only
    assert result.final_val_accuracy > 0.5
