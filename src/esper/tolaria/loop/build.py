"""Build a complete job (data, host, Kasmina, Tamiyo, trainer) from a `TolariaConfig`."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from esper.tolaria.config import ConfigError, TolariaConfig
from esper.tolaria.data import ResumableBatchSampler, make_loaders, worker_in_own_group
from esper.tolaria.drills import FaultPlan
from esper.tolaria.imports import call_factory, load_class
from esper.tolaria.loop.early_stopping import EarlyStopping
from esper.tolaria.loop.precision import resolve_device
from esper.tolaria.loop.trainer import TolariaTrainer
from esper.tolaria.models import HostMLP
from esper.tolaria.tasks import BUILTIN, Task
from esper.tolaria.tasks.protocol import missing_members

log = logging.getLogger(__name__)

_OPTIMIZERS: dict[str, Any] = {
    "sgd": lambda c: (torch.optim.SGD, {"lr": c.lr, "momentum": c.momentum, "weight_decay": c.weight_decay}),
    "adam": lambda c: (torch.optim.Adam, {"lr": c.lr, "weight_decay": c.weight_decay}),
    "adamw": lambda c: (torch.optim.AdamW, {"lr": c.lr, "weight_decay": c.weight_decay}),
    "rmsprop": lambda c: (torch.optim.RMSprop, {"lr": c.lr, "momentum": c.momentum, "weight_decay": c.weight_decay}),
}


def optimizer_factory(config: TolariaConfig) -> Any:
    cls, kwargs = _OPTIMIZERS[config.optimizer.name](config.optimizer)
    return lambda groups: cls(groups, **kwargs)


def default_slots(model: nn.Module) -> list[str]:
    """The input stem and every hidden activation of the host MLP (`stem`, `body.1`, `body.3`, ...).
    Another model names its slots in model.slots: where seeds may grow is the user's decision."""
    if not isinstance(model, HostMLP):
        names = [n for n, _ in model.named_modules() if n][:12]
        raise ConfigError(f"model.slots is empty: name the modules of your {type(model).__name__} where seeds may "
                          f"grow (their output is blended with the seed's), e.g. slots = {names[:3]}; its modules "
                          f"include {names}")
    hidden = [n for n, m in model.named_modules() if n.startswith("body.") and isinstance(m, nn.ReLU)]
    return ["stem", *hidden]


def build_trainer(config: TolariaConfig, *, run_dir: Path | None = None, faults: FaultPlan | None = None,
                  tamiyo: Any = None, verifier: Any = None, callbacks: tuple[Any, ...] = (),
                  world: Any = None, bus: Any = None) -> TolariaTrainer:
    from esper.kasmina import KasminaConfig, KasminaLayer
    from esper.kasmina.birth import grow_at_birth, read_manifest
    from esper.tamiyo import HeuristicTamiyo, TamiyoConfig

    configure_torch(config)
    rank, replicas = (world.rank, world.size) if world is not None else (0, 1)
    roots = [Path(p) for p in config.run.import_paths]
    task = build_task(config, roots)
    if config.data.factory:
        train, val = user_loaders(config, roots, num_replicas=replicas, rank=rank)
        sizes = None
    else:
        train, val, *size = make_loaders(config.data, seed=config.run.seed, num_replicas=replicas, rank=rank,
                                         pin_memory=_pins(config))
        sizes = (size[0], size[1])
    torch.manual_seed(config.run.seed)  # the host's initial weights: a function of the run's seed
    model = host_model(config, roots, sizes)
    # The bundled MLP's slot shapes are known before training (a resumed run may germinate at once).
    example = next(iter(val))[0][:2] if sizes is not None and not config.model.factory else None
    slots = config.model.slots or default_slots(model)
    kasmina = KasminaLayer(model, slots, config=KasminaConfig.model_validate(config.kasmina), seed=config.run.seed,
                           example_input=example)
    if config.model.initial_manifest:  # the static baseline: a grown structure, fixed from step 0
        grow_at_birth(kasmina, read_manifest(config.model.initial_manifest))
    if tamiyo is None and config.oona.remote_tamiyo:
        tamiyo, verifier = remote_tamiyo(config, verifier)
    controller = tamiyo if tamiyo is not None else HeuristicTamiyo(TamiyoConfig.model_validate(config.tamiyo))
    if config.early_stopping.patience:
        callbacks = (*callbacks, EarlyStopping(config.early_stopping, task))
    return TolariaTrainer(kasmina=kasmina, tamiyo=controller, optimizer=optimizer_factory(config),
                          train_loader=train, val_loader=val, task=task, config=config,
                          run_dir=run_dir, faults=faults, verifier=verifier, callbacks=callbacks, bus=bus,
                          world=world)


def host_model(config: TolariaConfig, roots: list[Path], sizes: tuple[int, int] | None) -> nn.Module:
    """model.factory's module, or the bundled MLP sized by the bundled data (features, classes)."""
    if config.model.factory:
        return call_factory(config.model.factory, config.model.kwargs, what="model.factory",  # type: ignore[no-any-return]
                            expect=nn.Module, expect_text="a torch.nn.Module (the host model)", roots=roots)
    if sizes is None:
        raise ConfigError("data.factory is set but model.factory is not: the bundled MLP is sized by the bundled "
                          "data sets only; set model.factory = \"package.module:function\" returning your nn.Module")
    return HostMLP(sizes[0], config.model.hidden, sizes[1], dropout=config.model.dropout)


def build_task(config: TolariaConfig, roots: list[Path]) -> Task:
    """The task named by `task`: a built-in name, or `package.module:Class` called with [task_options]."""
    name, options = config.task, dict(config.task_options)
    if name in BUILTIN:
        cls: Any = BUILTIN[name]
    elif ":" in name:
        cls = load_class(name, what="task", expect_text="implementing esper.tolaria.tasks.Task", roots=roots)
    else:
        raise ConfigError(f"task = {name!r}: expected one of {sorted(BUILTIN)} or \"package.module:Class\"")
    try:
        task = cls(**options)
    except TypeError as exc:
        raise ConfigError(f"task = {name!r}: [task_options] do not fit {cls.__name__}: {exc}") from None
    missing = missing_members(task)
    if missing:
        raise ConfigError(f"task = {name!r}: {cls.__name__} lacks {', '.join(missing)} of the "
                          "esper.tolaria.tasks.Task protocol")
    return task


def user_loaders(config: TolariaConfig, roots: list[Path], *, num_replicas: int, rank: int) -> tuple[Any, Any]:
    """(train, val) from data.factory: loaders are used as they are; datasets get Tolaria's loaders
    (the resumable sampler for training, so resume and skipping stay exact)."""
    data = call_factory(config.data.factory, config.data.kwargs, what="data.factory", roots=roots)
    if isinstance(data, Mapping) and {"train", "val"} <= set(data):
        train, val = data["train"], data["val"]
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        train, val = data
    else:
        raise ConfigError(f"data.factory = {config.data.factory!r} returned {type(data).__name__}; expected "
                          "(train, val) or {\"train\": ..., \"val\": ...} of DataLoaders or Datasets")
    return (_train_loader(train, config, num_replicas, rank), _val_loader(val, config))


def _is_dataset(data: Any) -> bool:
    return isinstance(data, Dataset) and not isinstance(data, DataLoader) and hasattr(data, "__len__")


def _train_loader(data: Any, config: TolariaConfig, num_replicas: int, rank: int) -> Any:
    if not _is_dataset(data):
        return data
    c = config.data
    sampler = ResumableBatchSampler(len(data), c.batch_size, seed=config.run.seed, num_replicas=num_replicas,
                                    rank=rank)
    return DataLoader(data, batch_sampler=sampler, num_workers=c.num_workers, persistent_workers=False,
                      pin_memory=_pins(config), worker_init_fn=worker_in_own_group)


def _val_loader(data: Any, config: TolariaConfig) -> Any:
    if not _is_dataset(data):
        return data
    return DataLoader(data, batch_size=config.data.val_batch_size, shuffle=False, pin_memory=_pins(config))


def _pins(config: TolariaConfig) -> bool:
    """Batches bound for a GPU are collated into pinned memory: their copy to the device then
    overlaps the step instead of blocking it (the placer copies without blocking from such loaders)."""
    return resolve_device(config.run.device).type == "cuda"


def remote_tamiyo(config: TolariaConfig, verifier: Any) -> tuple[Any, Any]:
    """A Tamiyo reached over Redis Streams; replies are verified again by Tolaria's handshake."""
    from esper.oona import CommandVerifier, RedisBus, load_secret
    from esper.tamiyo.remote import RemoteTamiyo

    if not config.oona.url:
        raise ValueError("oona.remote_tamiyo needs oona.url (or --oona redis://HOST:PORT/DB)")
    secret = load_secret(key_file=config.oona.secret_file or None)
    client = RemoteTamiyo(RedisBus(config.oona.url, secret=secret), secret=secret,
                          timeout_s=config.handshake.tamiyo_timeout_s)
    return client, verifier or CommandVerifier(secret)


CUBLAS_WORKSPACE = ":4096:8"
"""cuBLAS's deterministic workspace setting (NVIDIA's documented value; `:16:8` uses less memory)."""


def configure_torch(config: TolariaConfig) -> None:
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    if config.run.deterministic:
        deterministic_cublas()
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False  # benchmarking picks kernels by timing: not repeatable


def deterministic_cublas() -> None:
    """Set `CUBLAS_WORKSPACE_CONFIG` unless the user did: without it cuBLAS matrix products on
    CUDA >= 10.2 are not reproducible. cuBLAS reads it once, when its first handle is made, so it
    must be set before the first CUDA matmul of the process; said in the log either way."""
    found = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if found is not None:
        log.info("deterministic run: CUBLAS_WORKSPACE_CONFIG=%s (set by the environment)", found)
        return
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        log.info("deterministic run: set CUBLAS_WORKSPACE_CONFIG=%s after CUDA was initialised (a process "
                 "group does that); if a CUDA matmul already ran in this process, cuBLAS keeps its earlier "
                 "setting: export it before starting Python", CUBLAS_WORKSPACE)
    else:
        log.info("deterministic run: set CUBLAS_WORKSPACE_CONFIG=%s (cuBLAS reproducible)", CUBLAS_WORKSPACE)
