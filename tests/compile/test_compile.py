"""`run.compile` on the CPU: the host compiled in place keeps its parameter names, a seed grown after
compiling is in the compiled forward, a structure change compiles once, and nothing else recompiles.

The CPU tests compile with the `aot_eager` backend (dynamo's tracing and AOT autograd, no code
generation), so they need no C++ compiler; tests/gpu compiles with inductor on CUDA."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from esper.kasmina import KasminaConfig, KasminaLayer
from esper.leyline import SEED_OP_GERMINATE, SEED_OP_START_GRAFTING, SEED_OP_START_TRAINING, seed_command
from esper.tolaria.loop.compile import HostCompile, compile_host
from esper.tolaria.models import HostMLP

BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch.compiler.reset()
    counters.clear()
    saved = torch._dynamo.config.skip_nnmodule_hook_guards
    yield
    torch._dynamo.config.skip_nnmodule_hook_guards = saved
    torch.compiler.reset()


def compiled_frames() -> int:
    return int(counters["frames"]["ok"])


def _host() -> tuple[HostMLP, KasminaLayer]:
    torch.manual_seed(0)
    model = HostMLP(8, [16], 3)
    config = KasminaConfig(min_training_steps=1, blend_steps=4, evaluation_steps=1)
    return model, KasminaLayer(model, ["stem", "body.1"], config=config, example_input=torch.zeros(2, 8))


def _apply(kasmina: KasminaLayer, op: int, target: str) -> str:
    result = kasmina.apply_command(seed_command(op, issued_by="test", target_seed_id=target))
    assert result.ok, result.reason
    return str(result.seed_id)


def _blending_seed(kasmina: KasminaLayer) -> str:
    """Germinate at `stem`, train, graft; the seed's weights are moved off their init so it shows."""
    kasmina.on_epoch_end(0, 1.0, 0.5)
    seed = _apply(kasmina, SEED_OP_GERMINATE, "stem")
    _apply(kasmina, SEED_OP_START_TRAINING, seed)
    kasmina.on_step()
    with torch.no_grad():
        for p in kasmina.model.kasmina_seeds.parameters():
            p.add_(0.25)
    _apply(kasmina, SEED_OP_START_GRAFTING, seed)
    kasmina.on_step()
    assert kasmina.seed_record(seed).alpha > 0
    return seed


def _eager(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model._call_impl(x)  # type: ignore[no-any-return]  # the module's uncompiled call, hooks included


def test_off_leaves_the_model_alone() -> None:
    model, _ = _host()
    assert compile_host(model, False) is None
    assert model._compiled_call_impl is None


def test_compiling_in_place_keeps_the_parameter_names_and_objects() -> None:
    model, _ = _host()
    keys, params = list(model.state_dict()), list(model.parameters())
    compiled = compile_host(model, True, backend=BACKEND)
    assert isinstance(compiled, HostCompile) and compiled.summary() == {
        "mode": "default", "backend": BACKEND, "structure_resets": 0}
    x = torch.randn(4, 8)
    assert torch.equal(model(x), _eager(model, x))
    assert compiled_frames() == 1
    assert list(model.state_dict()) == keys  # no `_orig_mod.` prefix: checkpoints stay portable
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    eager_twin, _ = _host()
    eager_twin.load_state_dict(model.state_dict())  # a compiled run's state loads into an eager one


def test_a_seed_grown_after_compiling_is_in_the_compiled_forward() -> None:
    model, kasmina = _host()
    compile_host(model, True, backend=BACKEND)
    x = torch.randn(4, 8)
    before = model(x)
    _blending_seed(kasmina)
    after = model(x)
    assert not torch.equal(after, before)  # the seed changes the output ...
    assert torch.equal(after, _eager(model, x))  # ... exactly as the eager forward with its hook


def test_a_germination_compiles_once_and_steps_between_changes_compile_nothing() -> None:
    model, kasmina = _host()
    compiled = compile_host(model, True, backend=BACKEND)
    assert compiled is not None
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def steps(n: int) -> None:
        for i in range(n):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(i))
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            kasmina.on_step()

    steps(3)
    warm = compiled_frames()
    assert warm == 1
    kasmina.on_epoch_end(0, 1.0, 0.5)
    _apply(kasmina, SEED_OP_GERMINATE, "body.1")
    compiled.structure_changed()
    steps(5)
    assert compiled_frames() - warm == 1  # the new structure, once
    assert compiled.resets == 1


def test_alpha_ramp_steps_recompile_nothing() -> None:
    model, kasmina = _host()
    compile_host(model, True, backend=BACKEND)
    seed = _blending_seed(kasmina)
    x = torch.randn(4, 8)
    model(x)
    frames, alphas = compiled_frames(), []
    for _ in range(3):
        kasmina.on_step()  # alpha moves: a buffer written in place
        alphas.append(kasmina.seed_record(seed).alpha)
        assert torch.equal(model(x), _eager(model, x))
    assert len(set(alphas)) == 3
    assert compiled_frames() == frames


def test_a_mode_that_is_not_torch_compile_s_is_refused_with_the_fix() -> None:
    model, _ = _host()
    with pytest.raises(ValueError, match=r"run.compile = 'fastest' is not a torch.compile mode: use false, true"):
        compile_host(model, "fastest")
    with pytest.raises(ValueError, match="mode of the inductor backend"):
        compile_host(model, "max-autotune", backend=BACKEND)
    assert model._compiled_call_impl is None
