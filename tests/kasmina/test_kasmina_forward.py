"""Slot blending in the main forward, own-loss isolation, alpha, blueprints and the no-seed hot path."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from esper.kasmina import KasminaConfig, KasminaLayer, SeedModule, alpha_at
from esper.leyline import (
    SEED_OP_GERMINATE,
    SEED_OP_START_GRAFTING,
    SEED_OP_START_TRAINING,
    SEED_STAGE_BLENDING,
    SEED_STAGE_FOSSILIZED,
    SEED_STAGE_GERMINATED,
    SEED_STAGE_SHADOWING,
    SEED_STAGE_TRAINING,
)

from .helpers import CONFIG, apply_ok, drive_to, make_host, make_layer


def _seed(layer: KasminaLayer, seed_id: str) -> SeedModule:
    module = layer.model.kasmina_seeds[seed_id]
    assert isinstance(module, SeedModule)
    return module


def _wake(module: SeedModule) -> None:
    """Give a seed a non-zero output layer so its contribution is visible."""
    with torch.no_grad():
        module.body[2].weight.normal_()
        module.body[2].bias.normal_()


def _host_output(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The host's output computed functionally, bypassing every hook."""
    h = F.relu(F.linear(x, model[0].weight, model[0].bias))
    h = F.relu(F.linear(h, model[2].weight, model[2].bias))
    return F.linear(h, model[4].weight, model[4].bias)


# ------------------------------------------------------------------ alpha


@settings(max_examples=200, deadline=None)
@given(blend=st.integers(1, 10_000), a=st.integers(-5, 20_000), b=st.integers(-5, 20_000),
       k=st.floats(0.1, 50.0))
def test_alpha_is_bounded_and_monotone_non_decreasing(blend: int, a: int, b: int, k: float) -> None:
    lo, hi = sorted((a, b))
    assert 0.0 <= alpha_at(lo, blend, k) <= alpha_at(hi, blend, k) <= 1.0


@given(blend=st.integers(1, 10_000), k=st.floats(0.1, 50.0))
def test_alpha_is_exactly_zero_at_start_and_one_at_end_of_the_window(blend: int, k: float) -> None:
    assert alpha_at(0, blend, k) == 0.0
    assert alpha_at(blend, blend, k) == 1.0


def test_alpha_follows_a_sigmoid_with_its_midpoint_at_half_the_window() -> None:
    assert abs(alpha_at(50, 100) - 0.5) < 1e-12
    assert alpha_at(10, 100) < 0.1 and alpha_at(90, 100) > 0.9


def test_on_step_fills_the_alpha_buffer_in_place(layer: KasminaLayer) -> None:
    seed_id = drive_to(layer, SEED_STAGE_TRAINING)
    apply_ok(layer, SEED_OP_START_GRAFTING, seed_id)
    buffer = _seed(layer, seed_id).alpha
    pointer = buffer.data_ptr()
    layer.on_step()
    assert buffer.dim() == 0 and buffer.data_ptr() == pointer
    assert buffer.item() == torch.tensor(alpha_at(1, CONFIG.blend_steps, CONFIG.alpha_steepness)).item()


# ------------------------------------------------------------------ main forward


def test_a_fresh_seed_changes_nothing_at_any_stage(layer: KasminaLayer) -> None:
    x = torch.randn(5, 4)
    expected = layer.model(x)
    seed_id = drive_to(layer, SEED_STAGE_SHADOWING)
    assert _seed(layer, seed_id).alpha.item() == 1.0
    assert torch.equal(layer.model(x), expected)


def test_germinated_and_training_seeds_are_not_evaluated_in_the_main_forward(layer: KasminaLayer) -> None:
    calls: list[int] = []
    seed_id = apply_ok(layer, SEED_OP_GERMINATE, "3")
    _wake(_seed(layer, seed_id))
    _seed(layer, seed_id).register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(5, 4)
    assert torch.equal(layer.model(x), _host_output(layer.model, x))
    apply_ok(layer, SEED_OP_START_TRAINING, seed_id)
    assert torch.equal(layer.model(x), _host_output(layer.model, x))
    assert calls == []


def test_blending_output_is_h_plus_alpha_times_seed_of_h() -> None:
    torch.manual_seed(1)
    model = make_host()
    layer = KasminaLayer(model, ["4"], config=CONFIG, example_input=torch.zeros(1, 4))
    seed_id = apply_ok(layer, SEED_OP_GERMINATE, "4")
    apply_ok(layer, SEED_OP_START_TRAINING, seed_id)
    for _ in range(2):
        layer.on_step()
    apply_ok(layer, SEED_OP_START_GRAFTING, seed_id)
    seed = _seed(layer, seed_id)
    _wake(seed)
    layer.on_step()
    x = torch.randn(5, 4)
    h = _host_output(model, x)
    alpha = alpha_at(1, CONFIG.blend_steps, CONFIG.alpha_steepness)
    assert 0.0 < alpha < 1.0
    torch.testing.assert_close(model(x), h + alpha * seed.body(h), rtol=0, atol=1e-6)


def test_fossilized_seeds_stay_applied_frozen_and_stack_with_a_new_seed_in_the_same_slot(layer: KasminaLayer) -> None:
    seed_id = drive_to(layer, SEED_STAGE_FOSSILIZED, slot="3")
    seed = _seed(layer, seed_id)
    _wake(seed)
    assert all(not p.requires_grad for p in seed.parameters())
    x = torch.randn(5, 4)
    out = layer.model(x)
    assert not torch.equal(out, _host_output(layer.model, x))  # still applied
    out.sum().backward()
    assert all(p.grad is None for p in seed.parameters())
    second = apply_ok(layer, SEED_OP_GERMINATE, "3")
    assert second == "seed2" and layer.seed_record(seed_id).stage == SEED_STAGE_FOSSILIZED
    assert torch.equal(layer.model(x), out)  # a fresh seed adds nothing on top of the fossil


# ------------------------------------------------------------------ own loss isolation


def test_seed_own_loss_gives_upstream_host_exactly_zero_gradient_and_downstream_nonzero(layer: KasminaLayer) -> None:
    seed_id = apply_ok(layer, SEED_OP_GERMINATE, "1")  # slot "1" = ReLU after the first Linear
    _wake(_seed(layer, seed_id))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    terms = layer.seed_loss_terms(x, y, F.cross_entropy)
    assert [t.seed_id for t in terms] == [seed_id]
    term = terms[0]
    assert (term.stage, term.batch_size, term.alpha) == (SEED_STAGE_GERMINATED, 6, 0.0)
    names = [n for n, p in layer.model.named_parameters()]
    assert set(term.param_names) == {n for n in names if n.startswith("kasmina_seeds.seed1.")}
    params = dict(layer.model.named_parameters())
    grads = dict(zip(names, torch.autograd.grad(term.loss, list(params.values()), allow_unused=True), strict=True))
    for name in ("0.weight", "0.bias"):
        assert grads[name] is None or torch.count_nonzero(grads[name]) == 0
    for name in ("2.weight", "4.weight", "kasmina_seeds.seed1.body.0.weight", "kasmina_seeds.seed1.body.2.weight"):
        grad = grads[name]
        assert grad is not None and torch.count_nonzero(grad) > 0, name


def test_seed_own_loss_applies_the_seed_at_full_strength_while_main_forward_does_not(layer: KasminaLayer) -> None:
    seed_id = drive_to(layer, SEED_STAGE_TRAINING, slot="3")
    _wake(_seed(layer, seed_id))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    main = F.cross_entropy(layer.model(x), y)
    own = layer.seed_loss_terms(x, y, F.cross_entropy)[0].loss
    assert torch.equal(main, F.cross_entropy(_host_output(layer.model, x), y))
    assert not torch.equal(own, main)
    assert torch.equal(layer.model(x), _host_output(layer.model, x))  # own-loss mode is off again


def test_seed_loss_terms_cover_every_live_seed_and_skip_fossilized_ones(layer: KasminaLayer) -> None:
    drive_to(layer, SEED_STAGE_FOSSILIZED, slot="1")
    live = drive_to(layer, SEED_STAGE_BLENDING, slot="3")
    terms = layer.seed_loss_terms(torch.randn(2, 4), torch.tensor([0, 1]), F.cross_entropy)
    assert [(t.seed_id, t.stage) for t in terms] == [(live, SEED_STAGE_BLENDING)]


# ------------------------------------------------------------------ blueprints


def test_seed_weights_are_identical_across_processes_and_do_not_touch_the_global_rng() -> None:
    a, b, c = make_layer(seed=7), make_layer(seed=7), make_layer(seed=8)
    rng = torch.get_rng_state()
    for layer in (a, b, c):
        apply_ok(layer, SEED_OP_GERMINATE, "1", "bottleneck_adapter")
    assert torch.equal(torch.get_rng_state(), rng)
    wa, wb, wc = (_seed(x, "seed1").body[0].weight for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert torch.count_nonzero(_seed(a, "seed1").body[2].weight) == 0


def test_conv_residual_seeds_grow_a_convolutional_host() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    layer = KasminaLayer(model, ["1"], config=KasminaConfig(seed_hidden=5), example_input=torch.zeros(1, 3, 6, 6))
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    apply_ok(layer, SEED_OP_GERMINATE, "1", "conv_residual")
    assert _seed(layer, "seed1").body[0].weight.shape == (5, 4, 3, 3)
    assert torch.equal(model(x), before)


def test_a_model_without_seeds_has_no_hooks_left_after_the_probe() -> None:
    model = make_host()
    KasminaLayer(model, ["1", "3"], config=CONFIG, example_input=torch.zeros(1, 4))
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in make_host().named_parameters()]
