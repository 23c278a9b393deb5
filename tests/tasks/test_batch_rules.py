"""The batch and output rules every task reads through (`esper.tolaria.tasks.batch`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

from esper.tolaria.tasks import BatchError, ClassificationTask, LanguageModelTask, RegressionTask, move_batch
from esper.tolaria.tasks.batch import model_loss, prediction, split_batch


class TakesLabels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        logits = self.lin(x)
        out: dict[str, Any] = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels) * 0 + 7.0  # recognisably the model's own
        return out


class NoLabels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lin(x)


@dataclass
class Pair:
    x: torch.Tensor
    labels: torch.Tensor


class Named(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


def test_a_tuple_is_inputs_then_target() -> None:
    x1, x2, y = torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([0, 1])
    s = split_batch((x1, x2, y))
    assert s.args == (x1, x2) and s.target is y and s.kwargs == {}
    assert split_batch([x1]).target is None


@pytest.mark.parametrize("kind", [tuple, list, Named._make])
def test_a_pair_batch_reads_as_the_general_rules_read_it(kind: Any) -> None:
    """The (inputs, target) shortcut agrees with `split_batch` for tuples, lists and namedtuples:
    the model gets the inputs, the target is scored, the batch size is the target's length."""
    torch.manual_seed(0)
    model, task = NoLabels(), ClassificationTask()
    batch = kind([torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])])
    general = split_batch(batch, model)
    out = task.forward(model, batch)
    assert torch.equal(out, model(*general.args))
    pred, target = task.scored(out, batch)
    assert pred is out and target is general.target
    assert task.batch_size(batch) == 5
    with pytest.raises(BatchError, match="cannot tell its size"):  # a 0-d target: as the general rule says
        task.batch_size(kind([torch.randn(5, 4), torch.tensor(1)]))


def test_a_dict_passes_the_target_only_to_a_model_that_takes_it() -> None:
    batch = {"x": torch.randn(5, 4), "labels": torch.tensor([0, 1, 2, 0, 1])}
    assert "labels" in split_batch(batch, TakesLabels()).kwargs
    assert "labels" not in split_batch(batch, NoLabels()).kwargs
    assert split_batch(batch, NoLabels()).target is batch["labels"]


def test_the_models_own_loss_is_used_and_its_logits_scored() -> None:
    task, model = ClassificationTask(), TakesLabels()
    batch = {"x": torch.randn(5, 4), "labels": torch.tensor([0, 1, 2, 0, 1])}
    out = task.forward(model, batch)
    assert float(task.loss(out, batch)) == 7.0
    sums = task.metric_sums(out, batch)
    assert int(sums["count"]) == 5 and float(sums["loss_sum"]) == 35.0
    plain = ClassificationTask(use_model_loss=False)
    assert float(plain.loss(out, batch)) != 7.0


def test_a_dataclass_batch_reads_like_a_dict() -> None:
    task, model = ClassificationTask(), NoLabels()
    batch = Pair(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    out = task.forward(model, batch)
    assert out.shape == (3, 3) and task.batch_size(batch) == 3
    torch.testing.assert_close(task.loss(out, batch), nn.functional.cross_entropy(out, batch.labels))


def test_outputs_of_every_shape_give_their_prediction_and_loss() -> None:
    t = torch.randn(2, 3)
    assert prediction(t) is t and prediction((t, 1)) is t and prediction({"logits": t}) is t
    assert model_loss({"loss": torch.tensor(1.0)}) is not None and model_loss(t) is None
    with pytest.raises(BatchError, match="logits"):
        prediction("nonsense")


def test_a_bare_token_batch_is_shifted_by_the_language_model_task() -> None:
    task, model = LanguageModelTask(), nn.Embedding(11, 11)
    tokens = torch.randint(0, 11, (2, 9))
    out = task.forward(model, tokens)
    assert out.shape == (2, 8, 11)
    expected = nn.functional.cross_entropy(out.reshape(-1, 11), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(task.loss(out, tokens), expected)
    metrics = task.metrics({k: float(v) for k, v in task.metric_sums(out, tokens).items()})
    assert metrics["perplexity"] == pytest.approx(float(expected.exp()), rel=1e-5)
    assert set(metrics) == {"loss", "perplexity", "token_accuracy"}


def test_regression_scores_r2_and_mse() -> None:
    task, y = RegressionTask(), torch.tensor([1.0, 2.0, 3.0, 4.0])
    perfect = task.metrics({k: float(v) for k, v in task.metric_sums(y.unsqueeze(1), (y, y)).items()})
    assert perfect["r2"] == 1.0 and perfect["mse"] == 0.0
    mean = torch.full((4, 1), 2.5)
    assert task.metrics({k: float(v) for k, v in task.metric_sums(mean, (y, y)).items()})["r2"] == pytest.approx(0.0)
    torch.testing.assert_close(task.loss(mean, (y, y)), nn.functional.mse_loss(mean.squeeze(1), y))


def test_an_unknown_batch_type_is_named() -> None:
    with pytest.raises(BatchError, match="int"):
        ClassificationTask().forward(NoLabels(), 3)


def test_move_batch_keeps_the_structure() -> None:
    batch = {"a": (torch.ones(1), [torch.zeros(1)]), "b": Pair(torch.ones(1), torch.ones(1)),
             "c": Named(torch.ones(1), torch.zeros(1)), "d": "text"}
    moved = move_batch(batch, torch.device("cpu"))
    assert isinstance(moved["a"], tuple) and isinstance(moved["a"][1], list)
    assert isinstance(moved["b"], Pair) and isinstance(moved["c"], Named) and moved["d"] == "text"
