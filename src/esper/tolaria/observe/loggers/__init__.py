"""Experiment loggers behind one protocol (`Logger`): CSV, TensorBoard, MLflow, Weights & Biases.

`loggers_from_config(config, run_dir)` makes one trainer callback per logger that `[loggers]`
turns on; each callback reads the run log at every epoch's end and hands the logger plain values.
"""

from esper.tolaria.observe.loggers.callback import LoggerCallback, StepLoggerCallback
from esper.tolaria.observe.loggers.factory import loggers_from_config
from esper.tolaria.observe.loggers.protocol import Logger, MissingLoggerPackage, RunEvent, RunStart

__all__ = ["Logger", "LoggerCallback", "MissingLoggerPackage", "RunEvent", "RunStart", "StepLoggerCallback",
           "loggers_from_config"]
