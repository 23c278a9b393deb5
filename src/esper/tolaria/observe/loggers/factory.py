"""`loggers_from_config`: the trainer callbacks for the loggers `[loggers]` turns on.

Each enabled logger's package is imported here, so a missing one is an error at start, before
the run directory is touched; the loggers open nothing until the run begins (`FIT_BEGIN`).
`exporters.tensorboard_dir`, the older switch for TensorBoard, still turns the TensorBoard logger
on (with a FutureWarning naming the new keys).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from esper.tolaria.config import ConfigError, TolariaConfig
from esper.tolaria.observe.loggers.callback import LoggerCallback, StepLoggerCallback
from esper.tolaria.observe.loggers.csv_logger import CsvLogger
from esper.tolaria.observe.loggers.mlflow_logger import MlflowLogger
from esper.tolaria.observe.loggers.protocol import Logger
from esper.tolaria.observe.loggers.tensorboard_logger import TensorBoardLogger
from esper.tolaria.observe.loggers.wandb_logger import WandbLogger


def tensorboard_dir(config: TolariaConfig, run_dir: Path) -> Path | None:
    """Where TensorBoard writes, or None when it is off; the deprecated key is honoured with a warning."""
    new, old = config.loggers.tensorboard, config.exporters.tensorboard_dir
    if not old:
        return (Path(new.dir) if new.dir else run_dir / "tensorboard") if new.enabled else None
    if new.enabled and new.dir and Path(new.dir) != Path(old):
        raise ConfigError(f"exporters.tensorboard_dir = {old!r} and loggers.tensorboard.dir = {new.dir!r} disagree: "
                          f"remove exporters.tensorboard_dir (deprecated), keeping [loggers.tensorboard]")
    warnings.warn(f"exporters.tensorboard_dir is deprecated: write [loggers.tensorboard] enabled = true, "
                  f"dir = {old!r} instead (TensorBoard is on, writing to {old})", FutureWarning, stacklevel=2)
    return Path(old)


def loggers_from_config(config: TolariaConfig, run_dir: Path) -> list[LoggerCallback]:
    """One callback per enabled logger, in the order csv, tensorboard, mlflow, wandb. Only the
    rank that writes the run directory should attach them."""
    section = config.loggers
    loggers: list[Logger] = []
    if section.csv.enabled:
        loggers.append(CsvLogger(run_dir))
    if (board := tensorboard_dir(config, run_dir)) is not None:
        loggers.append(TensorBoardLogger(board))
    if section.mlflow.enabled:
        loggers.append(MlflowLogger(run_dir, tracking_uri=section.mlflow.tracking_uri,
                                    experiment=section.mlflow.experiment))
    if section.wandb.enabled:
        w = section.wandb
        loggers.append(WandbLogger(run_dir, project=w.project, entity=w.entity, mode=w.mode))
    every = section.step_every
    return [StepLoggerCallback(logger, every) if every else LoggerCallback(logger) for logger in loggers]
