"""Seeds on a host with BatchNorm and Dropout, and the task-agnostic own loss (`own_loss_terms`)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from esper.kasmina import KasminaConfig, KasminaLayer
from esper.leyline import (
    SEED_OP_FINE_TUNE,
    SEED_OP_FOSSILIZE,
    SEED_OP_GERMINATE,
    SEED_OP_STABILIZE,
    SEED_OP_START_GRAFTING,
    SEED_OP_START_TRAINING,
    SEED_STAGE_FOSSILIZED,
    SEED_STAGE_TRAINING,
)

from .helpers import apply_ok, drive_to

CONFIG = KasminaConfig(min_training_steps=2, blend_steps=3, seed_hidden=4, fossilize_tolerance=10.0)


class BNNet(nn.Module):
    """Conv -> BatchNorm -> ReLU [slot `conv.2`, (4, 6, 6)] -> dropout -> Linear -> ReLU [slot `fc.2`] -> head."""

    def __init__(self, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU())
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.drop(self.conv(x))))


def _layer(seed: int = 0, momentum: float | None = 0.1) -> KasminaLayer:
    torch.manual_seed(seed)
    return KasminaLayer(BNNet(momentum), ["conv.2", "fc.2"], config=CONFIG, example_input=torch.zeros(2, 1, 6, 6))


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("conv.1.")}


def _step(layer: KasminaLayer, optimizer: torch.optim.Optimizer, seed: int) -> None:
    """One training step as Tolaria runs it: main forward, own-loss pass, one backward, optimizer, on_step."""
    x, y = _batch(seed)
    layer.model.train()
    loss = F.cross_entropy(layer.model(x), y)
    terms = layer.own_loss_terms(lambda: F.cross_entropy(layer.model(x), y), len(y))
    (loss + sum((t.loss for t in terms), torch.zeros(()))).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    layer.on_step()


# ------------------------------------------------------------------ own_loss_terms


def test_own_loss_terms_runs_the_callers_closure_once_per_live_seed_in_own_loss_mode() -> None:
    layer = _layer()
    calls: list[int] = []
    x, y = _batch()

    def compute() -> torch.Tensor:  # a task with a non-standard forward: the closure owns it
        calls.append(1)
        return F.cross_entropy(layer.model(x), y, reduction="sum")

    assert layer.own_loss_terms(compute, 8) == [] and calls == []  # no live seed, no pass
    first = drive_to(layer, SEED_STAGE_TRAINING, slot="conv.2")
    second = apply_ok(layer, SEED_OP_GERMINATE, "fc.2")
    with torch.no_grad():
        layer.model.kasmina_seeds[first].body[2].weight.normal_()
    terms = layer.own_loss_terms(compute, 5)
    assert len(calls) == 2 and [t.seed_id for t in terms] == [first, second]
    assert all(t.batch_size == 5 for t in terms)
    assert terms[0].param_names == layer.param_names(first)
    layer.model.eval()
    with torch.no_grad():
        host = F.cross_entropy(layer.model(x), y, reduction="sum")
        own = layer.own_loss_terms(compute, 8)
    assert not torch.equal(own[0].loss, host) and torch.equal(own[1].loss, host)  # the woken seed was applied


def test_seed_loss_terms_is_own_loss_terms_with_the_model_called_on_inputs() -> None:
    layer = _layer()
    drive_to(layer, SEED_STAGE_TRAINING, slot="conv.2")
    layer.model.eval()  # no dropout: both calls see the same function
    x, y = _batch()
    via_wrapper = layer.seed_loss_terms(x, y, F.cross_entropy)
    direct = layer.own_loss_terms(lambda: F.cross_entropy(layer.model(x), y), 8)
    assert [(t.seed_id, t.batch_size) for t in via_wrapper] == [(t.seed_id, t.batch_size) for t in direct]
    assert torch.equal(via_wrapper[0].loss, direct[0].loss)


# ------------------------------------------------------------------ BatchNorm running statistics


@pytest.mark.parametrize("momentum", [0.1, None])  # None: BatchNorm's cumulative average reads the batch count
def test_the_own_loss_pass_leaves_the_hosts_batchnorm_running_stats_as_the_main_forward_left_them(
    momentum: float | None,
) -> None:
    layer = _layer(momentum=momentum)
    drive_to(layer, SEED_STAGE_TRAINING, slot="conv.2")
    apply_ok(layer, SEED_OP_GERMINATE, "fc.2")
    bn = layer.model.conv[1]
    buffers = [bn.running_mean, bn.running_var, bn.num_batches_tracked]
    x, y = _batch()
    layer.model.train()
    main = F.cross_entropy(layer.model(x), y)
    after_main = _bn_state(layer.model)
    terms = layer.seed_loss_terms(x, y, F.cross_entropy)
    (main + sum(t.loss for t in terms)).backward()
    after_own = _bn_state(layer.model)
    assert after_own.keys() == after_main.keys() and all(torch.equal(after_own[k], after_main[k]) for k in after_own)
    assert int(bn.num_batches_tracked) == 1  # the probe ran in eval mode, the main forward counted once
    assert all(a is b for a, b in zip(buffers, [bn.running_mean, bn.running_var, bn.num_batches_tracked],
                                      strict=True))  # the same tensor objects: nothing holding them goes stale


def test_the_own_loss_pass_normalises_with_the_batch_statistics_like_the_main_forward() -> None:
    layer = _layer()
    layer.model.drop.p = 0.0  # no dropout: the two passes must then agree exactly
    drive_to(layer, SEED_STAGE_TRAINING, slot="fc.2")  # a fresh seed downstream of the BatchNorm adds nothing
    x, y = _batch()
    layer.model.train()
    main = F.cross_entropy(layer.model(x), y)
    (term,) = layer.seed_loss_terms(x, y, F.cross_entropy)
    assert torch.equal(term.loss, main)


# ------------------------------------------------------------------ the whole lifecycle


def _grown() -> KasminaLayer:
    """conv.2: seed1 trained, blended and fossilized; fc.2: seed2 in training. Real optimizer steps."""
    layer = _layer()
    optimizer = torch.optim.SGD(layer.model.parameters(), lr=0.05)
    layer.on_epoch_end(0, 1.0, 0.5)
    seed = apply_ok(layer, SEED_OP_GERMINATE, "conv.2")
    assert layer.seed_record(seed).blueprint == "conv_residual"
    optimizer.add_param_group({"params": list(layer.model.kasmina_seeds[seed].parameters())})
    apply_ok(layer, SEED_OP_START_TRAINING, seed)
    step = iter(range(100))
    for _ in range(CONFIG.min_training_steps):
        _step(layer, optimizer, next(step))
    apply_ok(layer, SEED_OP_START_GRAFTING, seed)
    for _ in range(CONFIG.blend_steps):
        _step(layer, optimizer, next(step))
    for op in (SEED_OP_STABILIZE, SEED_OP_FINE_TUNE, SEED_OP_FOSSILIZE):
        apply_ok(layer, op, seed)
    second = apply_ok(layer, SEED_OP_GERMINATE, "fc.2")
    optimizer.add_param_group({"params": list(layer.model.kasmina_seeds[second].parameters())})
    apply_ok(layer, SEED_OP_START_TRAINING, second)
    _step(layer, optimizer, next(step))
    assert layer.seed_record(seed).stage == SEED_STAGE_FOSSILIZED
    assert torch.count_nonzero(layer.model.kasmina_seeds[seed].body[2].weight) > 0  # it did learn
    return layer


def test_a_bn_and_dropout_host_grows_and_round_trips_bit_exactly_through_manifest_and_state_dict() -> None:
    grown = _grown()
    manifest, saved = json.loads(json.dumps(grown.state_dict())), grown.model.state_dict()
    fresh = _layer(seed=9)  # other host weights and BatchNorm statistics until the load
    fresh.load_state_dict(manifest)
    fresh.model.load_state_dict(saved)
    assert fresh.manifest() == grown.manifest()
    x, y = _batch(50)
    for mode in ("eval", "train"):
        outputs = []
        for layer in (grown, fresh):
            getattr(layer.model, mode)()
            torch.manual_seed(7)  # the same dropout masks
            outputs.append(layer.model(x))
        assert torch.equal(*outputs), mode
    for layer in (grown, fresh):
        torch.manual_seed(8)
        layer.model.train()
        (term,) = layer.seed_loss_terms(x, y, F.cross_entropy)  # seed2's own-loss pass still works
        term.loss.backward()
    grads = [[p.grad for p in layer.model.kasmina_seeds["seed2"].parameters()] for layer in (grown, fresh)]
    assert all(g is not None and torch.equal(g, h) for g, h in zip(*grads, strict=True))
    assert torch.equal(grown.model.conv[1].running_mean, fresh.model.conv[1].running_mean)
