"""Gradient aggregation: stage weights, PCGrad against a flattened reference, modes, non-finite."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import nn

from esper.contracts import SeedLossTerm
from esper.leyline import (
    SEED_STAGE_BLENDING,
    SEED_STAGE_CULLED,
    SEED_STAGE_DORMANT,
    SEED_STAGE_EMBARGOED,
    SEED_STAGE_FOSSILIZED,
    SEED_STAGE_GERMINATED,
    SEED_STAGE_PROBATIONARY,
    SEED_STAGE_RESETTING,
    SEED_STAGE_SHADOWING,
    SEED_STAGE_TERMINATED,
    SEED_STAGE_TRAINING,
    SEED_STAGE_UNKNOWN,
)
from esper.tolaria.control.aggregation import AggregationConfig, GradientAggregator, seed_weight
from optim.toy import ToySeeded, batch


def _term(stage: int, alpha: float = 0.3, evaluating: bool = False, loss: torch.Tensor | None = None) -> SeedLossTerm:
    return SeedLossTerm(
        seed_id="s", stage=stage, alpha=alpha, in_evaluation=evaluating,
        loss=torch.tensor(1.0) if loss is None else loss, batch_size=8,
    )


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        (SEED_STAGE_UNKNOWN, 0.0),
        (SEED_STAGE_DORMANT, 0.0),
        (SEED_STAGE_GERMINATED, 0.01),
        (SEED_STAGE_TRAINING, 0.1),
        (SEED_STAGE_BLENDING, 0.3),
        (SEED_STAGE_SHADOWING, 0.5),
        (SEED_STAGE_PROBATIONARY, 1.0),
        (SEED_STAGE_FOSSILIZED, 0.0),
        (SEED_STAGE_CULLED, 0.0),
        (SEED_STAGE_EMBARGOED, 0.0),
        (SEED_STAGE_RESETTING, 0.0),
        (SEED_STAGE_TERMINATED, 0.0),
    ],
)
def test_seed_weight_follows_lifecycle_stage(stage: int, expected: float) -> None:
    assert seed_weight(_term(stage, alpha=0.3)) == pytest.approx(expected)


def test_seed_weight_is_zero_while_evaluating_and_alpha_is_clamped() -> None:
    assert seed_weight(_term(SEED_STAGE_PROBATIONARY, evaluating=True)) == 0.0
    assert seed_weight(_term(SEED_STAGE_BLENDING, alpha=1.7)) == 1.0
    assert seed_weight(_term(SEED_STAGE_BLENDING, alpha=-0.2)) == 0.0


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValidationError):
        AggregationConfig(mode="pcgrad", maxnorm=1.0)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="max_grad_norm must be > 0"):
        AggregationConfig(max_grad_norm=0.0)
    with pytest.raises(ValidationError):
        AggregationConfig(mode="sum")  # type: ignore[arg-type]


def test_none_mode_without_seeds_is_bitwise_plain_backward() -> None:
    torch.manual_seed(0)
    model = ToySeeded()
    twin = copy.deepcopy(model)
    x, y = batch()
    F.mse_loss(twin(x), y).backward()
    stats = GradientAggregator().backward(F.mse_loss(model(x), y), [], dict(model.named_parameters()))
    assert stats.finite
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert q.grad is not None and p.grad is not None, name
        assert torch.equal(p.grad, q.grad), name


def test_unchecked_step_without_seeds_is_plain_backward_and_still_guards_the_loss() -> None:
    """The few-operation path (no terms, no gradient read, no clipping): same gradients as a plain
    backward, the loss read, and a non-finite loss still clears every gradient and is counted."""
    torch.manual_seed(5)
    model = ToySeeded()
    twin = copy.deepcopy(model)
    x, y = batch()
    F.mse_loss(twin(x), y).backward()
    agg = GradientAggregator()
    stats = agg.backward(F.mse_loss(model(x), y), [], dict(model.named_parameters()), check_grads=False)
    assert stats.finite and not stats.grad_checked and math.isnan(stats.grad_norm) and stats.seeds == {}
    assert stats.total_loss == pytest.approx(F.mse_loss(twin(x), y).item())
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert p.grad is not None and q.grad is not None and torch.equal(p.grad, q.grad), name
    model.zero_grad(set_to_none=True)
    stats = agg.backward(F.mse_loss(model(x), y) * float("nan"), [], dict(model.named_parameters()), check_grads=False)
    assert not stats.finite and math.isnan(stats.total_loss)
    assert all(p.grad is None for p in model.parameters())
    assert agg.state_dict()["steps"] == 2 and agg.state_dict()["nonfinite_steps"] == 1


def test_none_mode_with_seeds_backprops_weighted_batch_scaled_total() -> None:
    torch.manual_seed(1)
    model = ToySeeded()
    model.add_seed("a")
    model.add_seed("b")
    twin = copy.deepcopy(model)
    x, y = batch()
    terms = model.seed_terms(x, y, stage=SEED_STAGE_SHADOWING)
    stats = GradientAggregator().backward(F.mse_loss(model(x), y), terms, dict(model.named_parameters()), 64)
    ref_terms = twin.seed_terms(x, y, stage=SEED_STAGE_SHADOWING)
    total = F.mse_loss(twin(x), y) + sum(0.5 * (32 / 64) * t.loss for t in ref_terms)
    total.backward()
    assert stats.total_loss == pytest.approx(total.item(), rel=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert stats.seeds["a"]["weight"] == 0.5


def test_unchecked_step_with_seeds_matches_the_checked_step_but_measures_no_seed_geometry() -> None:
    """Mode none with weighted seeds and no gradient read: the same gradients and losses as the checked
    step, seed norms and cosines NaN (the fused backward never separates them), and a non-finite
    seed loss still clears every gradient."""
    torch.manual_seed(3)
    model = ToySeeded()
    model.add_seed("a")
    twin = copy.deepcopy(model)
    x, y = batch()
    checked = GradientAggregator().backward(F.mse_loss(twin(x), y), twin.seed_terms(x, y, stage=SEED_STAGE_SHADOWING),
                                            dict(twin.named_parameters()), 64)
    agg = GradientAggregator()
    stats = agg.backward(F.mse_loss(model(x), y), model.seed_terms(x, y, stage=SEED_STAGE_SHADOWING),
                         dict(model.named_parameters()), 64, check_grads=False)
    assert stats.finite and not stats.grad_checked and math.isnan(stats.grad_norm)
    assert stats.total_loss == checked.total_loss and stats.seeds["a"]["loss"] == checked.seeds["a"]["loss"]
    assert math.isnan(stats.seeds["a"]["grad_norm"]) and stats.seeds["a"]["projected"] is False
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert p.grad is not None and q.grad is not None and torch.equal(p.grad, q.grad), name
    model.zero_grad(set_to_none=True)
    terms = [dataclasses.replace(t, loss=t.loss * float("inf")) for t in model.seed_terms(x, y, SEED_STAGE_SHADOWING)]
    stats = agg.backward(F.mse_loss(model(x), y), terms, dict(model.named_parameters()), 64, check_grads=False)
    assert not stats.finite and all(p.grad is None for p in model.parameters()) and agg.nonfinite_steps == 1


def test_accumulate_runs_a_bare_backward_only_when_no_seed_term_weighs() -> None:
    torch.manual_seed(4)
    model = ToySeeded()
    model.add_seed("a")
    x, y = batch()
    agg = GradientAggregator()
    assert not agg.accumulate(F.mse_loss(model(x), y), model.seed_terms(x, y, stage=SEED_STAGE_SHADOWING))
    assert all(p.grad is None for p in model.parameters()), "declined: nothing ran"
    fossil = model.seed_terms(x, y, stage=SEED_STAGE_FOSSILIZED)  # weighs 0: takes no part
    twin = copy.deepcopy(model)
    (0.25 * F.mse_loss(twin(x), y)).backward()
    assert agg.accumulate(F.mse_loss(model(x), y), fossil, lambda loss: 0.25 * loss)
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(p.grad, q.grad) if q.grad is not None else p.grad is None, name
    agg.discard(dict(model.named_parameters()))
    assert all(p.grad is None for p in model.parameters()) and agg.nonfinite_steps == 1 and agg.steps == 0


def _linear_problem(
    gen: torch.Generator, n_host: int, n_seeds: int
) -> tuple[dict[str, nn.Parameter], dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Parameters, the host gradient, and per-seed gradients (linear losses make them exact)."""
    params: dict[str, nn.Parameter] = {}
    for j in range(n_host):
        shape = (int(torch.randint(1, 4, (1,), generator=gen)), int(torch.randint(1, 5, (1,), generator=gen)))
        params[f"host.{j}"] = nn.Parameter(torch.zeros(shape))
    for i in range(n_seeds):
        params[f"kasmina_seeds.s{i}.w"] = nn.Parameter(torch.zeros(3))
    gh = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    seeds = []
    for i in range(n_seeds):
        touched = [n for n in params if n.startswith("host.") and bool(torch.rand((), generator=gen) < 0.7)]
        gi = {n: torch.randn(params[n].shape, generator=gen) for n in touched}
        if touched and bool(torch.rand((), generator=gen) < 0.5):
            gi[touched[0]] = -3.0 * gh[touched[0]]  # force a conflict often
        gi[f"kasmina_seeds.s{i}.w"] = torch.randn(3, generator=gen)
        seeds.append(gi)
    return params, gh, seeds


def _losses(
    params: dict[str, nn.Parameter], gh: dict[str, torch.Tensor], seeds: list[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, list[SeedLossTerm]]:
    host = sum((gh[n] * p).sum() for n, p in params.items())
    terms = []
    for i, gi in enumerate(seeds):
        loss = sum((g * params[n]).sum() for n, g in gi.items())
        terms.append(
            SeedLossTerm(
                seed_id=f"s{i}", stage=SEED_STAGE_PROBATIONARY, alpha=1.0, in_evaluation=False,
                loss=loss, batch_size=4, param_names=(f"kasmina_seeds.s{i}.w",),
            )
        )
    return host, terms


def _reference_pcgrad(
    params: dict[str, nn.Parameter], gh: dict[str, torch.Tensor], seeds: list[dict[str, torch.Tensor]], eps: float
) -> dict[str, torch.Tensor]:
    """Straightforward PCGrad: flatten each seed's shared gradients, project against the host's, add."""
    total = {n: g.clone() for n, g in gh.items()}
    for i, gi in enumerate(seeds):
        own = f"kasmina_seeds.s{i}.w"
        shared = [n for n in gi if n != own]
        if shared:
            vi = torch.cat([gi[n].reshape(-1) for n in shared]).double()
            vh = torch.cat([gh[n].reshape(-1) for n in shared]).double()
            dot = torch.dot(vi, vh)
            if dot < 0:
                vi = vi - dot / (vh.dot(vh) + eps) * vh
            offset = 0
            for n in shared:
                k = gi[n].numel()
                total[n] += vi[offset : offset + k].reshape(gi[n].shape).float()
                offset += k
        total[own] += gi[own]
    return total


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_host=st.integers(1, 5), n_seeds=st.integers(1, 4))
def test_pcgrad_matches_flattened_reference(seed: int, n_host: int, n_seeds: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    params, gh, seeds = _linear_problem(gen, n_host, n_seeds)
    host, terms = _losses(params, gh, seeds)
    agg = GradientAggregator(AggregationConfig(mode="pcgrad"))
    stats = agg.backward(host, terms, params)
    expected = _reference_pcgrad(params, gh, seeds, agg.config.eps)
    assert stats.finite
    for name, p in params.items():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-5, msg=name)
    flat = torch.cat([p.grad.reshape(-1) for p in params.values() if p.grad is not None])
    assert stats.grad_norm == pytest.approx(flat.norm().item(), rel=1e-5)


def test_pcgrad_leaves_non_conflicting_gradients_untouched() -> None:
    gen = torch.Generator().manual_seed(3)
    params, gh, _ = _linear_problem(gen, 3, 0)
    own = nn.Parameter(torch.zeros(3))
    params["kasmina_seeds.s0.w"] = own
    gh["kasmina_seeds.s0.w"] = torch.randn(3, generator=gen)
    gi = {n: 0.5 * g + 0.01 * torch.rand(g.shape, generator=gen) for n, g in gh.items() if n.startswith("host.")}
    gi["kasmina_seeds.s0.w"] = torch.randn(3, generator=gen)
    host, terms = _losses(params, gh, [gi])
    stats = GradientAggregator(AggregationConfig(mode="pcgrad")).backward(host, terms, params)
    for name, p in params.items():
        assert torch.equal(p.grad, gh[name] + gi[name]), name
    assert stats.seeds["s0"]["projected"] is False
    assert stats.seeds["s0"]["cosine_with_host"] > 0.9


def test_pcgrad_projection_removes_the_conflicting_component() -> None:
    h = nn.Parameter(torch.zeros(4))
    params = {"host.w": h}
    gh = {"host.w": torch.tensor([1.0, 0.0, 0.0, 0.0])}
    gi = {"host.w": torch.tensor([-2.0, 1.0, 0.0, 0.0])}
    host, terms = _losses(params, gh, [gi])
    terms = [SeedLossTerm(**{**t.__dict__, "param_names": ()}) for t in terms]
    stats = GradientAggregator(AggregationConfig(mode="pcgrad")).backward(host, terms, params)
    torch.testing.assert_close(h.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert stats.seeds["s0"]["projected"] is True
    assert stats.seeds["s0"]["cosine_with_host"] == pytest.approx(-2 / math.sqrt(5), rel=1e-5)
    assert stats.seeds["s0"]["grad_norm"] == pytest.approx(math.sqrt(5), rel=1e-6)


def test_pcgrad_runs_one_backward_per_weighted_seed_only() -> None:
    torch.manual_seed(2)
    model = ToySeeded()
    for s in ("a", "b", "c"):
        model.add_seed(s)
    x, y = batch()
    terms = model.seed_terms(x, y)
    terms[1] = SeedLossTerm(**{**terms[1].__dict__, "stage": SEED_STAGE_FOSSILIZED})
    calls = []
    original = torch.autograd.grad

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    torch.autograd.grad = counting  # type: ignore[assignment]
    try:
        stats = GradientAggregator(AggregationConfig(mode="pcgrad")).backward(
            F.mse_loss(model(x), y), terms, dict(model.named_parameters())
        )
    finally:
        torch.autograd.grad = original
    assert len(calls) == 3  # host + two weighted seeds
    assert stats.seeds["b"]["weight"] == 0.0
    assert model.kasmina_seeds["b"][0].weight.grad is not None  # host loss still reaches it through alpha


def test_average_mode_means_host_and_seed_on_shared_params() -> None:
    gen = torch.Generator().manual_seed(5)
    params, gh, seeds = _linear_problem(gen, 2, 1)
    host, terms = _losses(params, gh, seeds)
    GradientAggregator(AggregationConfig(mode="average")).backward(host, terms, params)
    for name, p in params.items():
        if name in seeds[0] and name.startswith("host."):
            expected = (gh[name] + seeds[0][name]) / 2
        else:
            expected = gh[name] + seeds[0].get(name, torch.zeros_like(gh[name]))
        torch.testing.assert_close(p.grad, expected, msg=name)


def test_priority_mode_drops_seed_gradient_on_conflicting_tensors() -> None:
    a, b, own = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    params = {"host.a": a, "host.b": b, "kasmina_seeds.s0.w": own}
    gh = {"host.a": torch.tensor([1.0, 1.0]), "host.b": torch.tensor([1.0, 0.0]), "kasmina_seeds.s0.w": torch.ones(2)}
    gi = {"host.a": torch.tensor([-1.0, 0.5]), "host.b": torch.tensor([2.0, 3.0]), "kasmina_seeds.s0.w": -torch.ones(2)}
    host, terms = _losses(params, gh, [gi])
    stats = GradientAggregator(AggregationConfig(mode="priority")).backward(host, terms, params)
    torch.testing.assert_close(a.grad, gh["host.a"])  # conflict: host wins
    torch.testing.assert_close(b.grad, gh["host.b"] + gi["host.b"])
    torch.testing.assert_close(own.grad, torch.zeros(2))  # own params are never dropped
    assert stats.seeds["s0"]["projected"] is True


@pytest.mark.parametrize("mode", ["none", "pcgrad", "average", "priority"])
def test_non_finite_loss_clears_every_gradient(mode: str) -> None:
    torch.manual_seed(4)
    model = ToySeeded()
    model.add_seed("a")
    x, y = batch()
    terms = model.seed_terms(x, y)
    terms[0] = SeedLossTerm(**{**terms[0].__dict__, "loss": terms[0].loss * float("inf")})
    agg = GradientAggregator(AggregationConfig(mode=mode, max_grad_norm=1.0))  # type: ignore[arg-type]
    stats = agg.backward(F.mse_loss(model(x), y), terms, dict(model.named_parameters()))
    assert not stats.finite
    assert all(p.grad is None for p in model.parameters())
    assert agg.state_dict()["nonfinite_steps"] == 1


def test_nan_gradient_with_finite_loss_is_caught() -> None:
    p = nn.Parameter(torch.ones(3))
    loss = (p * torch.tensor([1.0, float("nan"), 1.0])).nansum()
    stats = GradientAggregator().backward(loss, [], {"w": p})
    assert math.isfinite(loss.item())
    assert not stats.finite and p.grad is None


def test_grad_norm_is_root_of_sum_of_squares_and_clipping_applies() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    loss = (torch.tensor([3.0, 0.0]) * a).sum() + (torch.tensor([4.0]) * b).sum()
    stats = GradientAggregator(AggregationConfig(max_grad_norm=1.0)).backward(loss, [], {"a": a, "b": b})
    assert stats.grad_norm == pytest.approx(5.0)  # not 3 + 4
    clipped = torch.cat([a.grad, b.grad]).norm().item()
    assert clipped == pytest.approx(1.0, rel=1e-4)


def test_aggregator_counters_survive_state_dict_round_trip() -> None:
    agg = GradientAggregator(AggregationConfig(mode="pcgrad"))
    h = nn.Parameter(torch.zeros(2))
    host, terms = _losses({"host.w": h}, {"host.w": torch.tensor([1.0, 0.0])}, [{"host.w": torch.tensor([-1.0, 1.0])}])
    terms = [SeedLossTerm(**{**t.__dict__, "param_names": ()}) for t in terms]
    agg.backward(host, terms, {"host.w": h})
    restored = GradientAggregator(AggregationConfig(mode="pcgrad"))
    restored.load_state_dict(agg.state_dict())
    assert restored.state_dict() == {"steps": 1, "nonfinite_steps": 0, "projections": {"s0": 1}}


# ---------------------------------------------------------------- fp16/bf16: norms in fp32
def _low_precision_model(dtype: torch.dtype) -> nn.Linear:
    model = nn.Linear(100, 1, bias=False).to(dtype)
    model.weight.grad = torch.full_like(model.weight, 30.0)  # ‖g‖ = 30·√100 = 300: 300² overflows fp16
    return model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_low_precision_gradient_norm_of_300_reads_300_and_finite(dtype: torch.dtype) -> None:
    from esper.tolaria.control.aggregation import _total_norm, fp32_norms
    from esper.tolaria.recovery.snapshots import tensors_finite

    model = _low_precision_model(dtype)
    grad = model.weight.grad
    assert grad is not None
    norm = _total_norm([grad], torch.device("cpu"))
    assert norm.dtype == torch.float32 and norm.item() == pytest.approx(300.0, rel=1e-3)
    big = torch.full((50_000,), 300.0, dtype=dtype)  # one tensor's norm 67 082 > fp16's 65 504
    assert fp32_norms([big])[0].item() == pytest.approx(67_082.0, rel=1e-2)
    assert tensors_finite([big, grad])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_real_nonfinite_low_precision_value_still_reads_nonfinite(dtype: torch.dtype, bad: float) -> None:
    from esper.tolaria.control.aggregation import _total_norm
    from esper.tolaria.recovery.snapshots import tensors_finite

    g = torch.full((100,), 30.0, dtype=dtype)
    g[7] = bad
    assert not math.isfinite(_total_norm([g], torch.device("cpu")).item())
    assert not tensors_finite([g])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clipping_low_precision_gradients_measures_the_true_norm(dtype: torch.dtype) -> None:
    model = nn.Linear(50_000, 1, bias=False).to(dtype)
    loss = (model.weight * 300.0).sum().float()  # every gradient 300: ‖g‖ = 67 082, over fp16's 65 504
    agg = GradientAggregator(AggregationConfig(max_grad_norm=1.0))
    stats = agg.backward(loss, [], dict(model.named_parameters()))
    assert stats.finite and stats.grad_norm == pytest.approx(67_082.0, rel=1e-2)
    grad = model.weight.grad
    assert grad is not None
    assert torch.linalg.vector_norm(grad, dtype=torch.float32).item() == pytest.approx(1.0, rel=1e-2)


@pytest.mark.parametrize("mode", ["pcgrad", "average", "priority"])
def test_split_modes_measure_fp16_seed_geometry_in_fp32(mode: str) -> None:
    torch.manual_seed(0)
    model = ToySeeded().half()
    model.add_seed("s1")
    model.half()
    x, y = batch()
    x, y = x.half(), y.half()
    scale = 400.0  # gradients large enough that their squares overflow fp16
    host_loss = F.mse_loss(model(x), y).float() * scale
    terms = [dataclasses.replace(t, loss=t.loss.float() * scale) for t in model.seed_terms(x, y)]
    stats = GradientAggregator(AggregationConfig(mode=mode)).backward(host_loss, terms, dict(model.named_parameters()))
    assert stats.finite and math.isfinite(stats.grad_norm), stats
    seed = stats.seeds["s1"]
    assert math.isfinite(seed["grad_norm"]) and math.isfinite(seed["cosine_with_host"]), seed
