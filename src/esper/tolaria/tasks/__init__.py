"""Tasks: what a training step computes and how validation scores it (see `protocol`).

May import torch only: the loop, the evaluation and the bench build on it.
"""

from esper.tolaria.tasks.batch import BatchError, move_batch
from esper.tolaria.tasks.builtin import (
    BUILTIN,
    ClassificationTask,
    Criterion,
    LanguageModelTask,
    RegressionTask,
    SupervisedTask,
)
from esper.tolaria.tasks.protocol import Task, score

__all__ = ["BUILTIN", "BatchError", "ClassificationTask", "Criterion", "LanguageModelTask", "RegressionTask",
           "SupervisedTask",
           "Task", "move_batch", "score"]
