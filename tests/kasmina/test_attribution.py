"""Counterfactual attribution: each applied seed's contribution to validation loss and score."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper.kasmina import KasminaConfig, KasminaLayer
from esper.leyline import SEED_STAGE_BLENDING, SEED_STAGE_PROBATIONARY, SEED_STAGE_SHADOWING, SEED_STAGE_TRAINING
from esper.tolaria.loop.evaluate import evaluate
from esper.tolaria.tasks import ClassificationTask

from .helpers import drive_to, make_layer


def _loader(n: int = 48, features: int = 4, classes: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def _seed_body(layer: KasminaLayer, seed_id: str) -> nn.Module:
    return layer.model.kasmina_seeds[seed_id].body  # type: ignore[index,union-attr]


def test_a_seed_that_outputs_zeros_has_no_attribution() -> None:
    torch.manual_seed(0)
    layer = make_layer()
    seed_id = drive_to(layer, SEED_STAGE_PROBATIONARY)
    for param in _seed_body(layer, seed_id).parameters():
        param.data.zero_()  # the seed's output is exactly zero
    result = evaluate(layer.model, _loader(), ClassificationTask(), seeds=layer)
    assert set(result.attribution) == {seed_id}
    assert result.attribution[seed_id]["loss"] == pytest.approx(0.0, abs=1e-9)
    assert result.attribution[seed_id]["score"] == pytest.approx(0.0, abs=1e-9)


class _Permute(nn.Module):
    """A seed body whose output turns h into h[:, perm]: h + (P - I) h."""

    def __init__(self, perm: list[int]) -> None:
        super().__init__()
        eye = torch.eye(len(perm))
        self.linear = nn.Linear(len(perm), len(perm), bias=False)
        self.linear.weight.data.copy_(eye[perm] - eye)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h)


def test_a_seed_that_is_the_only_useful_path_has_positive_attribution() -> None:
    # The host passes its input through; the label is the argmax of the input permuted, which only
    # the seed computes.
    host = nn.Sequential(nn.Linear(3, 3, bias=False))
    host[0].weight.data.copy_(torch.eye(3))
    layer = KasminaLayer(host, ["0"], config=KasminaConfig(min_training_steps=2, blend_steps=3),
                         example_input=torch.zeros(1, 3))
    seed_id = drive_to(layer, SEED_STAGE_SHADOWING, slot="0")
    layer.model.kasmina_seeds[seed_id].body = _Permute([2, 0, 1])  # type: ignore[index,union-attr]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 3, generator=g) * 3
    loader = [(x, x[:, [2, 0, 1]].argmax(dim=1))]
    result = evaluate(layer.model, loader, ClassificationTask(), seeds=layer)
    assert result.score == 1.0  # with the seed the model is right everywhere
    assert result.attribution[seed_id]["score"] > 0.5
    assert result.attribution[seed_id]["loss"] > 0.0


def test_the_fused_pass_equals_one_pass_per_seed() -> None:
    torch.manual_seed(0)
    layer = make_layer()
    first = drive_to(layer, SEED_STAGE_PROBATIONARY, slot="1")
    second = drive_to(layer, SEED_STAGE_BLENDING, slot="3")
    layer.model.kasmina_seeds[second].alpha.fill_(0.4)  # type: ignore[index,union-attr]
    for seed_id in (first, second):  # born function-preserving (output zero): give them an effect
        for param in _seed_body(layer, seed_id).parameters():
            param.data.normal_(0.0, 0.5)
    loader, task = _loader(), ClassificationTask()
    forwards: list[int] = []
    counting = layer.model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    fused = evaluate(layer.model, loader, task, seeds=layer)
    counting.remove()
    assert forwards == [16, 16, 16]  # one pass over the loader, not one per seed
    separate = evaluate(layer.model, loader, task, seeds=layer, fuse=False)
    plain = evaluate(layer.model, loader, task)
    assert set(fused.attribution) == {first, second}
    assert fused.loss == pytest.approx(plain.loss, abs=1e-6) and fused.score == plain.score
    for seed_id in (first, second):
        for name in ("loss", "score"):
            assert fused.attribution[seed_id][name] == pytest.approx(separate.attribution[seed_id][name], abs=1e-6)
        assert abs(fused.attribution[seed_id]["loss"]) > 1e-4  # each seed changes the output


def test_seeds_the_forward_does_not_apply_are_not_attributed() -> None:
    torch.manual_seed(0)
    layer = make_layer()
    drive_to(layer, SEED_STAGE_TRAINING)
    result = evaluate(layer.model, _loader(), ClassificationTask(), seeds=layer)
    assert result.attribution == {}


def test_attribution_reaches_the_exported_seed_metrics() -> None:
    torch.manual_seed(0)
    layer = make_layer()
    seed_id = drive_to(layer, SEED_STAGE_PROBATIONARY)
    result = evaluate(layer.model, _loader(), ClassificationTask(), seeds=layer)
    state = next(s for s in layer.export_seed_states() if s.seed_id == seed_id)
    assert state.metrics["attribution_loss"] == pytest.approx(result.attribution[seed_id]["loss"], rel=1e-6)
    assert state.metrics["attribution_score"] == pytest.approx(result.attribution[seed_id]["score"], rel=1e-6)


def test_a_model_whose_output_cannot_be_split_is_attributed_one_case_per_pass() -> None:
    class Scalar(nn.Module):  # mixes every row into one number: no fused form exists
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.inner(x)
            return {"logits": logits, "loss": logits.square().mean()}

    torch.manual_seed(0)
    model = Scalar()
    layer = KasminaLayer(model, ["inner.1"], config=KasminaConfig(min_training_steps=2, blend_steps=3),
                         example_input=torch.zeros(2, 4))
    seed_id = drive_to(layer, SEED_STAGE_PROBATIONARY, slot="inner.1")
    loader, task = _loader(), ClassificationTask()
    fused = evaluate(layer.model, loader, task, seeds=layer)
    separate = evaluate(layer.model, loader, task, seeds=layer, fuse=False)
    assert fused.attribution[seed_id] == separate.attribution[seed_id]


def test_the_first_seeded_slot_runs_its_seed_once_per_batch_and_a_switched_off_seed_not_at_all() -> None:
    torch.manual_seed(0)
    layer = make_layer()
    first = drive_to(layer, SEED_STAGE_PROBATIONARY, slot="1")
    second = drive_to(layer, SEED_STAGE_PROBATIONARY, slot="3")
    rows: dict[str, list[int]] = {first: [], second: []}
    for seed_id, seen in rows.items():
        _seed_body(layer, seed_id).register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0].shape[0]))
    loader, task = _loader(), ClassificationTask()
    evaluate(layer.model, loader, task, seeds=layer)
    assert rows[first] == [16, 16, 16]  # before the cases differ: the batch's rows once
    assert rows[second] == [48, 48, 48]  # after them: three cases (all on, first off, second off)
    rows[first].clear()
    evaluate(layer.model, loader, task, seeds=layer, fuse=False)
    assert rows[first] == [16] * 6  # the plain pass and the pass with the second seed off; not its own
