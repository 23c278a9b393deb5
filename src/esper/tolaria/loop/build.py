"""Build a complete job (data, host, Kasmina, Tamiyo, trainer) from a `TolariaConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from esper.tolaria.config import TolariaConfig
from esper.tolaria.data import make_loaders
from esper.tolaria.drills import FaultPlan
from esper.tolaria.loop.trainer import TolariaTrainer
from esper.tolaria.models import HostMLP

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
    """The input stem and every hidden activation of the host MLP (`stem`, `body.1`, `body.3`, ...)."""
    hidden = [n for n, m in model.named_modules() if n.startswith("body.") and isinstance(m, nn.ReLU)]
    return ["stem", *hidden]


def build_trainer(config: TolariaConfig, *, run_dir: Path | None = None, faults: FaultPlan | None = None,
                  tamiyo: Any = None, verifier: Any = None, callbacks: tuple[Any, ...] = (),
                  world: Any = None, bus: Any = None) -> TolariaTrainer:
    from esper.kasmina import KasminaConfig, KasminaLayer
    from esper.tamiyo import HeuristicTamiyo, TamiyoConfig

    configure_torch(config)
    rank, replicas = (world.rank, world.size) if world is not None else (0, 1)
    train, val, features, classes = make_loaders(config.data, seed=config.run.seed, num_replicas=replicas, rank=rank)
    torch.manual_seed(config.run.seed)
    model = HostMLP(features, config.model.hidden, classes, dropout=config.model.dropout)
    slots = config.model.slots or default_slots(model)
    kasmina = KasminaLayer(model, slots, config=KasminaConfig.model_validate(config.kasmina), seed=config.run.seed,
                           example_input=next(iter(val))[0][:2])
    if tamiyo is None and config.oona.remote_tamiyo:
        tamiyo, verifier = remote_tamiyo(config, verifier)
    controller = tamiyo if tamiyo is not None else HeuristicTamiyo(TamiyoConfig.model_validate(config.tamiyo))
    return TolariaTrainer(kasmina=kasmina, tamiyo=controller, optimizer=optimizer_factory(config),
                          train_loader=train, val_loader=val, loss_fn=nn.functional.cross_entropy, config=config,
                          run_dir=run_dir, faults=faults, verifier=verifier, callbacks=callbacks, bus=bus,
                          world=world)


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


def configure_torch(config: TolariaConfig) -> None:
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    if config.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
