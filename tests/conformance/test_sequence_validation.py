"""`TolariaTrainer.validate` scores sequence models per token: logits [B, T, V] against targets [B, T]."""

from __future__ import annotations

from pathlib import Path

import torch

from conformance.workloads import build_trainer, lm_loss


def _by_hand(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    return float(lm_loss(logits, targets)), float((logits.argmax(dim=-1) == targets).float().mean())


def test_validation_of_a_sequence_model_counts_every_token(tmp_path: Path) -> None:
    trainer = build_trainer("lm", tmp_path / "run")
    try:
        batches = list(trainer.val_loader)
        assert batches[0][1].dim() == 2, "the LM's targets are [B, T]"
        validation = trainer.validate()
        val_loss, val_accuracy = validation.loss, validation.score
        expected_loss, expected_accuracy = _by_hand(trainer.model, batches)
    finally:
        trainer.close()
    assert abs(val_accuracy - expected_accuracy) < 1e-9
    assert abs(val_loss - expected_loss) < 1e-5


def test_validation_of_a_classifier_is_unchanged(tmp_path: Path) -> None:
    trainer = build_trainer("mlp", tmp_path / "run")
    try:
        validation = trainer.validate()
        val_loss, val_accuracy = validation.loss, validation.score
        trainer.model.eval()
        with torch.no_grad():
            pairs = [(trainer.model(x), y) for x, y in trainer.val_loader]
    finally:
        trainer.close()
    out, y = torch.cat([o for o, _ in pairs]), torch.cat([t for _, t in pairs])
    assert val_accuracy == float((out.argmax(dim=1) == y).sum()) / len(y)
    assert abs(val_loss - float(torch.nn.functional.cross_entropy(out, y))) < 1e-6
