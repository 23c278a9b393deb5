"""Training through tasks from the Python API: regression, dict batches with the model's own loss,
gradient accumulation, bf16 autocast and fp16 loss scaling on the CPU, and the run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from esper.kasmina import KasminaLayer
from esper.tamiyo import HeuristicTamiyo
from esper.tolaria.config import config_from_dict
from esper.tolaria.data import ResumableBatchSampler
from esper.tolaria.loop.trainer import TolariaTrainer
from esper.tolaria.tasks import ClassificationTask, RegressionTask, Task


def config(**sections: Any) -> Any:
    base: dict[str, Any] = {"run": {"epochs": 3, "morphogenesis": False}, "checkpoint": {"enabled": False},
                            "telemetry": {"jsonl": False, "step_interval": 0}, "lr": {"host_policy": "constant"},
                            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0},
                            "boundary": {"total_ms": 1e6, "state_assembly_ms": 1e6, "tamiyo_ms": 1e6,
                                         "apply_ms": 1e6, "check_ms": 1e6},
                            "emergency": {"broadcast": False}}
    for key, values in sections.items():
        base[key] = {**base.get(key, {}), **values}
    return config_from_dict(base)


def trainer_for(model: nn.Module, slots: list[str], train: Any, val: Any, task: Task, cfg: Any,
                run_dir: Path | None = None) -> TolariaTrainer:
    kasmina = KasminaLayer(model, slots, seed=cfg.run.seed)
    lr, momentum = cfg.optimizer.lr, cfg.optimizer.momentum
    return TolariaTrainer(kasmina=kasmina, tamiyo=HeuristicTamiyo(), task=task, config=cfg, run_dir=run_dir,
                          optimizer=lambda groups: torch.optim.SGD(groups, lr=lr, momentum=momentum),
                          train_loader=train, val_loader=val)


def loader(dataset: Dataset[Any], batch_size: int, seed: int = 0) -> DataLoader[Any]:
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed=seed)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_sampler=sampler)


def regression_data() -> tuple[TensorDataset, TensorDataset]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(384, 6, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.5]) + 0.05 * torch.randn(384, generator=gen)
    return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])


def regressor() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))


def test_a_regression_task_reports_r2_and_mse_not_accuracy(tmp_path: Path) -> None:
    train, val = regression_data()
    trainer = trainer_for(regressor(), ["1"], loader(train, 16), DataLoader(val, batch_size=64), RegressionTask(),
                          config(run={"epochs": 6}))
    s = trainer.fit().summary
    assert s["task"] == {"name": "regression", "primary_metric": "r2", "higher_is_better": True}
    assert set(s["final_val_metrics"]) == {"loss", "mse", "r2"}
    assert s["final_val_metrics"]["r2"] > 0.9
    assert s["final_val_accuracy"] == s["final_val_metrics"]["r2"]  # the score is the primary metric
    assert s["final_val_loss"] == pytest.approx(s["final_val_metrics"]["mse"])


class DictData(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.x[i], "labels": self.y[i]}


class Output:
    """A Hugging Face style output: attributes, `loss` present when labels were given."""

    def __init__(self, logits: torch.Tensor, loss: torch.Tensor | None) -> None:
        self.logits, self.loss = logits, loss


class HFStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)
        self.saw_labels = 0

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        logits = self.head(self.body(features))
        self.saw_labels += labels is not None
        return Output(logits, nn.functional.cross_entropy(logits, labels) if labels is not None else None)


def test_a_dict_batch_model_returning_its_own_loss_trains(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    torch.manual_seed(0)
    model = HFStyle()
    trainer = trainer_for(model, ["body.1"], loader(DictData(x[:240], y[:240]), 20),
                          DataLoader(DictData(x[240:], y[240:]), batch_size=30), ClassificationTask(),
                          config(run={"epochs": 5}, optimizer={"lr": 0.3}))
    s = trainer.fit().summary
    assert model.saw_labels > 0, "the model got its labels, as Hugging Face models expect"
    losses = [h["train_loss"] for h in s["history"]]
    assert losses[-1] < losses[0] * 0.8
    assert s["final_val_accuracy"] > 0.7


def test_four_micro_batches_of_8_equal_one_batch_of_32() -> None:
    gen = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(128, 6, generator=gen), torch.randint(0, 3, (128,), generator=gen))
    val = DataLoader(data, batch_size=64)
    finals = []
    for batch, k in ((32, 1), (8, 4)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        cfg = config(optimizer={"accumulate_steps": k}, aggregation={"max_grad_norm": 0.5})
        trainer = trainer_for(model, ["1"], loader(data, batch), val, ClassificationTask(), cfg)
        s = trainer.fit().summary
        assert s["global_step"] == 3 * 4 and s["accumulate_steps"] == k  # optimizer steps, not micro-batches
        finals.append(({n: p.detach().clone() for n, p in model.named_parameters()}, s["history"]))
    (one, h1), (four, h4) = finals
    for name in one:
        torch.testing.assert_close(four[name], one[name], rtol=1e-5, atol=1e-6)
    assert [h["train_loss"] for h in h4] == pytest.approx([h["train_loss"] for h in h1], rel=1e-5)


def classifier_parts() -> tuple[nn.Module, DataLoader[Any], DataLoader[Any]]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(320, 8, generator=gen)
    y = (x[:, :3].sum(1) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    return model, loader(TensorDataset(x[:256], y[:256]), 16), DataLoader(TensorDataset(x[256:], y[256:]),
                                                                          batch_size=64)


def test_bf16_autocast_trains_on_the_cpu() -> None:
    model, train, val = classifier_parts()
    seen: list[torch.dtype] = []
    model[0].register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    s = trainer_for(model, ["1"], train, val, ClassificationTask(), config(run={"precision": "bf16"})).fit().summary
    assert torch.bfloat16 in seen, "the forward ran under bf16 autocast"
    assert next(model.parameters()).dtype == torch.float32, "weights stay fp32"
    assert s["precision"]["precision"] == "bf16" and s["final_val_accuracy"] > 0.8


def test_fp16_overflow_steps_are_skipped_by_the_scaler_not_incidents() -> None:
    model, train, val = classifier_parts()
    trainer = trainer_for(model, ["1"], train, val, ClassificationTask(),
                          config(run={"precision": "fp16", "epochs": 4}, emergency={"grad_check_every": 1}))
    assert trainer.precision.scaler is not None
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows fp16 at once
    s = trainer.fit().summary
    assert s["precision"]["overflow_steps"] > 0
    assert s["precision"]["loss_scale"] < 2.0**40
    assert s["emergencies"] == [] and s["rollbacks"] == []
    assert s["final_val_accuracy"] > 0.8, "once the scale came down, training went on"


def test_an_unavailable_device_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error is for machines without it")
    model, train, val = classifier_parts()
    with pytest.raises(ValueError, match="no CUDA device"):
        trainer_for(model, ["1"], train, val, ClassificationTask(), config(run={"device": "cuda"}))


def test_a_python_api_run_writes_the_run_directory(tmp_path: Path) -> None:
    from esper.tolaria.observe.report import generate_report

    model, train, val = classifier_parts()
    run = tmp_path / "run"
    trainer_for(model, ["1"], train, val, ClassificationTask(), config(checkpoint={"enabled": True},
                                                                      telemetry={"jsonl": True}), run).fit()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 3
    assert json.loads((run / "config.json").read_text())["run"]["epochs"] == 3
    assert (run / "telemetry.jsonl").stat().st_size > 0 and list((run / "checkpoints").glob("ckpt-*"))
    generate_report(run)
    assert (run / "report" / "index.html").is_file()


def test_the_report_and_console_name_the_tasks_primary_metric(tmp_path: Path) -> None:
    from esper.tolaria.cli import _primary
    from esper.tolaria.observe.report import generate_report

    train, val = regression_data()
    run = tmp_path / "run"
    trainer_for(regressor(), ["1"], loader(train, 32), DataLoader(val, batch_size=64), RegressionTask(),
                config(run={"epochs": 2}), run).fit()
    generate_report(run)
    html = (run / "report" / "index.html").read_text()
    assert "final validation r2" in html and "final validation accuracy" not in html
    summary = json.loads((run / "summary.json").read_text())
    assert _primary(summary).startswith("r2 ")
    assert _primary({**summary, "task": {"primary_metric": "token_accuracy"},
                     "final_val_metrics": {"token_accuracy": 0.5, "perplexity": 5.0}}) == \
        "token_accuracy 0.5000 (perplexity 5.00)"
