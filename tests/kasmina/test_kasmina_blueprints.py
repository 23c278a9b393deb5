"""Blueprints by activation shape: "auto", lowrank_adapter, attention_head, their contract, errors and manifests."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from esper.kasmina import BLUEPRINTS, BlueprintError, BlueprintSpec, KasminaConfig, KasminaLayer, build_blueprint
from esper.kasmina.blueprints import fitting_blueprints, resolve_blueprint
from esper.leyline import SEED_OP_GERMINATE, SEED_STAGE_SHADOWING

from .helpers import CONFIG, apply_ok, cmd, drive_to

SPEC = BlueprintSpec(hidden=6, adapter_dim=3, rank=2, head_dim=4, causal=True)
FITTING = [(name, shape) for name in sorted(BLUEPRINTS) for shape in [(5,), (7, 6), (3, 4, 4)]
           if BLUEPRINTS[name].fits(shape)]


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _wake(module: nn.Module) -> None:
    """Give every weight (the zeroed output layer too) a visible value."""
    with torch.no_grad():
        for param in module.parameters():
            param.normal_()


class TokenHost(nn.Module):
    """A position-wise token model: embedding [B, T, C] -> `mix` (slot) -> vocab head. No token sees another."""

    def __init__(self, vocab: int = 11, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Sequential(nn.Linear(width, width), nn.GELU())
        self.head = nn.Linear(width, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.embed(idx)))


def _token_layer(config: KasminaConfig) -> KasminaLayer:
    torch.manual_seed(0)
    return KasminaLayer(TokenHost(), ["mix"], config=config, example_input=torch.zeros(2, 5, dtype=torch.long))


# ------------------------------------------------------------------ auto


@pytest.mark.parametrize(("shape", "expected"), [((6,), "residual_mlp"), ((7, 6), "residual_mlp"),
                                                 ((4, 5, 5), "conv_residual")])
def test_auto_picks_the_blueprint_by_the_per_sample_shape(shape: tuple[int, ...], expected: str) -> None:
    assert resolve_blueprint("auto", shape) == expected
    assert resolve_blueprint(expected, shape) == expected  # a named blueprint stays itself


def test_auto_is_the_default_and_an_empty_blueprint_id_records_the_resolved_name() -> None:
    assert KasminaConfig().default_blueprint == "auto"
    layer = _token_layer(KasminaConfig(seed_hidden=5))
    result = layer.apply_command(cmd(SEED_OP_GERMINATE, "mix"))
    assert result.ok and "residual_mlp, picked by auto for shape (5, 8)" in result.reason
    assert layer.seed_record("seed1").blueprint == "residual_mlp"
    assert layer.manifest()["seeds"][0]["blueprint"] == "residual_mlp"
    assert layer.model.kasmina_seeds["seed1"].body[0].weight.shape == (5, 8)  # token-wise on the last dim


def test_a_configured_default_blueprint_is_used_for_an_empty_blueprint_id() -> None:
    layer = _token_layer(KasminaConfig(default_blueprint="lowrank_adapter", lowrank_rank=3))
    apply_ok(layer, SEED_OP_GERMINATE, "mix")
    assert layer.seed_record("seed1").blueprint == "lowrank_adapter"
    assert layer.model.kasmina_seeds["seed1"].body[0].weight.shape == (3, 8)


def test_the_config_accepts_auto_and_known_blueprints_and_names_the_choices_otherwise() -> None:
    for name in ["auto", *BLUEPRINTS]:
        assert KasminaConfig(default_blueprint=name).default_blueprint == name
    with pytest.raises(ValidationError, match=r"'mlp' is unknown; use 'auto' \(pick by shape\) or one of"):
        KasminaConfig(default_blueprint="mlp")


# ------------------------------------------------------------------ the blueprint contract


@pytest.mark.parametrize(("name", "shape"), FITTING)
def test_every_blueprint_is_fresh_identity_deterministic_cpu_float32_and_rng_free(
    name: str, shape: tuple[int, ...]
) -> None:
    rng = torch.get_rng_state()
    a, b = build_blueprint(name, shape, SPEC, _generator(1)), build_blueprint(name, shape, SPEC, _generator(1))
    other = build_blueprint(name, shape, SPEC, _generator(2))
    assert torch.equal(torch.get_rng_state(), rng)
    params = list(a.parameters())
    assert params and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    assert all(torch.equal(p, q) for p, q in zip(params, b.parameters(), strict=True))
    assert any(not torch.equal(p, q) for p, q in zip(params, other.parameters(), strict=True))
    x = torch.randn(3, *shape)
    out = a(x)
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # a fresh seed adds nothing


def test_lowrank_adapter_is_down_then_zeroed_up_projection_without_bias() -> None:
    body = build_blueprint("lowrank_adapter", (7, 6), SPEC, _generator())
    down, up = body[0], body[1]
    assert isinstance(down, nn.Linear) and isinstance(up, nn.Linear) and len(body) == 2
    assert (down.weight.shape, up.weight.shape) == ((2, 6), (6, 2))
    assert down.bias is None and up.bias is None
    assert torch.count_nonzero(down.weight) > 0 and torch.count_nonzero(up.weight) == 0
    _wake(body)
    x = torch.randn(4, 7, 6)
    torch.testing.assert_close(body(x), x @ down.weight.T @ up.weight.T)


def test_attention_head_projects_to_head_dim_and_zeroes_its_output_projection() -> None:
    head = build_blueprint("attention_head", (5, 6), SPEC, _generator())
    assert [tuple(getattr(head, n).weight.shape) for n in ("q", "k", "v", "out")] == [(4, 6)] * 3 + [(6, 4)]
    assert torch.count_nonzero(head.out.weight) == 0 and torch.count_nonzero(head.out.bias) == 0


@pytest.mark.parametrize("causal", [True, False])
def test_a_causal_attention_head_never_lets_a_token_see_the_future(causal: bool) -> None:
    head = build_blueprint("attention_head", (6, 8), BlueprintSpec(4, 2, head_dim=4, causal=causal), _generator())
    _wake(head)
    torch.manual_seed(5)
    x = torch.randn(3, 6, 8)
    out = head(x)
    leaked = False
    for t in range(5):
        changed = x.clone()
        changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:])
        same = torch.equal(head(changed)[:, : t + 1], out[:, : t + 1])
        assert same or not causal, f"position <= {t} changed when only later tokens did"
        leaked |= not same
    assert leaked != causal  # without the mask the future does leak: the test can see a leak


def test_an_attention_seed_in_a_token_model_is_causal_end_to_end_and_records_its_widths() -> None:
    layer = _token_layer(CONFIG.model_copy(update={"attention_head_dim": 3}))
    seed_id = drive_to(layer, SEED_STAGE_SHADOWING, slot="mix", blueprint="attention_head")  # applied at alpha 1
    record = layer.seed_record(seed_id)
    assert (record.blueprint, record.head_dim, record.causal) == ("attention_head", 3, True)
    _wake(layer.model.kasmina_seeds[seed_id].body)
    idx = torch.randint(0, 11, (2, 5))
    out = layer.model(idx)
    for t in range(4):
        changed = idx.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1) % 11
        assert torch.equal(layer.model(changed)[:, : t + 1], out[:, : t + 1])


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("attention_head", (8,), "attention_head does not fit per-sample shape (8,): it needs (T, C) token sequences; "
                                 "blueprints that fit (8,): bottleneck_adapter, lowrank_adapter, residual_mlp"),
        ("lowrank_adapter", (4, 5, 5),
         "needs (F,) features or (T, C) tokens; blueprints that fit (4, 5, 5): bottleneck_adapter, conv_residual, "
         "residual_mlp"),
        ("conv_residual", (7, 6), "blueprints that fit (7, 6): attention_head, bottleneck_adapter, lowrank_adapter"),
        ("auto", (2, 3, 4, 5), "'auto' has no rule for per-sample shape (2, 3, 4, 5)"),
        ("auto", (), "no blueprint fits per-sample shape (): a slot must output at least [batch, features]"),
        ("mlp", (8,), "unknown blueprint 'mlp'; known blueprints: ['attention_head', 'bottleneck_adapter', "
                      "'conv_residual', 'lowrank_adapter', 'residual_mlp'] or 'auto'"),
    ],
)
def test_a_blueprint_that_does_not_fit_names_the_shape_and_the_blueprints_that_do(
    name: str, shape: tuple[int, ...], expected: str
) -> None:
    with pytest.raises(BlueprintError) as info:
        build_blueprint(name, shape, SPEC, _generator())
    assert expected in str(info.value)


def test_fitting_blueprints_lists_what_each_shape_accepts() -> None:
    assert fitting_blueprints((5,)) == ["bottleneck_adapter", "lowrank_adapter", "residual_mlp"]
    assert fitting_blueprints((7, 6)) == ["attention_head", "bottleneck_adapter", "lowrank_adapter", "residual_mlp"]
    assert fitting_blueprints((3, 4, 4)) == ["bottleneck_adapter", "conv_residual", "residual_mlp"]


# ------------------------------------------------------------------ manifests


def test_a_resume_rebuilds_each_seed_from_its_record_not_from_the_current_config() -> None:
    layer = _token_layer(KasminaConfig(lowrank_rank=2, attention_head_dim=3, attention_causal=False))
    apply_ok(layer, SEED_OP_GERMINATE, "mix", "attention_head")
    manifest, saved = layer.manifest(), layer.model.state_dict()
    fresh = _token_layer(KasminaConfig())  # other widths, causal: the record must win
    result = fresh.load_manifest(manifest)
    assert result.ok, result.reason
    fresh.model.load_state_dict(saved)
    head = fresh.model.kasmina_seeds["seed1"].body
    assert head.q.weight.shape == (3, 8) and head.causal is False
    assert fresh.manifest() == manifest


def test_a_version_1_manifest_with_explicit_blueprint_names_still_loads() -> None:
    layer = _token_layer(KasminaConfig())
    apply_ok(layer, SEED_OP_GERMINATE, "mix", "bottleneck_adapter")
    old = copy.deepcopy(layer.manifest())
    old["version"] = 1
    for record in old["seeds"]:
        for field in ("rank", "head_dim", "causal"):
            del record[field]
    fresh = _token_layer(KasminaConfig())
    assert fresh.load_manifest(old).ok
    assert fresh.seed_record("seed1").blueprint == "bottleneck_adapter"
    assert fresh.manifest() == layer.manifest()  # written back as version 2 with the defaults


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("blueprint", "auto", "record blueprint 'auto'"), ("causal", "yes", "causal must be true or false")],
)
def test_a_manifest_record_with_an_unresolved_blueprint_or_a_bad_flag_is_rejected(
    field: str, value: object, expected: str
) -> None:
    layer = _token_layer(KasminaConfig())
    apply_ok(layer, SEED_OP_GERMINATE, "mix")
    manifest = layer.manifest()
    manifest["seeds"][0][field] = value
    result = _token_layer(KasminaConfig()).load_manifest(manifest)
    assert not result.ok and expected in result.reason
