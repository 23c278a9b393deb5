"""The conformance workloads and the scripted Tamiyo that grows them.

Three tiny CPU workloads, each drawing random numbers in its forward (dropout), so any shift of
the RNG stream on resume changes the final weights:

- `mlp`: the digits MLP with dropout (the built-in `HostMLP`);
- `cnn`: a small CNN with BatchNorm and dropout on the 8x8 digits images, a `conv_residual`
  seed on the conv block and a `residual_mlp` seed on the flat features;
- `lm`: a two-block causal transformer LM on a char corpus (the source of `json.decoder`),
  logits `[B, T, V]`, seeds on block outputs `[B, T, C]`.

`ScriptedTamiyo` walks every workload through the same lifecycle at fixed epochs (`SCRIPT`):
seed1 is germinated, trained, blended, shadowed and fossilized; seed2 is germinated, trained,
blended and culled. Everything is a pure function of (workload, seed, epochs, num_workers).
"""

from __future__ import annotations

import gzip
import importlib.util
import inspect
import json
import json.decoder
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from esper.kasmina import KasminaConfig, KasminaLayer
from esper.leyline import (
    SEED_OP_CULL,
    SEED_OP_FINE_TUNE,
    SEED_OP_FOSSILIZE,
    SEED_OP_GERMINATE,
    SEED_OP_STABILIZE,
    SEED_OP_START_GRAFTING,
    SEED_OP_START_TRAINING,
    AdaptationCommand,
    SystemStatePacket,
    noop_command,
    seed_command,
)
from esper.tolaria.config import TolariaConfig, config_from_dict
from esper.tolaria.data import ResumableBatchSampler
from esper.tolaria.loop.build import configure_torch, default_slots
from esper.tolaria.loop.trainer import TolariaTrainer
from esper.tolaria.models import HostMLP

EPOCHS = 11
"""Long enough for the whole SCRIPT plus one epoch after the cull."""

FIRST, SECOND = "first-slot", "second-slot"
SCRIPT: dict[int, tuple[int, str]] = {
    0: (SEED_OP_GERMINATE, FIRST),
    1: (SEED_OP_START_TRAINING, "seed1"),
    2: (SEED_OP_START_GRAFTING, "seed1"),
    3: (SEED_OP_STABILIZE, "seed1"),
    4: (SEED_OP_FINE_TUNE, "seed1"),
    5: (SEED_OP_FOSSILIZE, "seed1"),
    6: (SEED_OP_GERMINATE, SECOND),
    7: (SEED_OP_START_TRAINING, "seed2"),
    8: (SEED_OP_START_GRAFTING, "seed2"),
    9: (SEED_OP_CULL, "seed2"),
}
"""Epoch -> (operation, target): a slot placeholder for GERMINATE, else a seed id."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ScriptedTamiyo:
    """A `TamiyoClient` that answers `SCRIPT` for the packet's epoch and a no-op otherwise.

    Stateless by default, so a resumed run is asked, and answers, exactly what the uninterrupted
    run was. With `answered_file` it behaves like a remote controller that outlives the trainer:
    it remembers (in that file) every epoch it already answered and answers a repeated question
    with a no-op, so a command lost by the trainer is not handed out a second time.
    """

    def __init__(self, slots: Sequence[str], blueprints: Sequence[str], *, answered_file: Path | None = None) -> None:
        self._slots = {FIRST: (slots[0], blueprints[0]), SECOND: (slots[1], blueprints[1])}
        self._answered_file = answered_file

    def evaluate_epoch(self, packet: SystemStatePacket) -> AdaptationCommand:
        epoch = int(packet.current_epoch)
        if self._answered_file is not None:
            answered = set(json.loads(self._answered_file.read_text())) if self._answered_file.exists() else set()
            if epoch in answered:
                return noop_command(issued_by="scripted-tamiyo", reason=f"epoch {epoch} already answered")
            self._answered_file.write_text(json.dumps(sorted(answered | {epoch})))
        if epoch not in SCRIPT:
            return noop_command(issued_by="scripted-tamiyo", reason="nothing scripted")
        op, target = SCRIPT[epoch]
        if op == SEED_OP_GERMINATE:
            slot, blueprint = self._slots[target]
            return seed_command(op, issued_by="scripted-tamiyo", target_seed_id=slot, blueprint_id=blueprint,
                                reason=f"scripted germination at epoch {epoch}")
        return seed_command(op, issued_by="scripted-tamiyo", target_seed_id=target, reason=f"scripted at epoch {epoch}")


@dataclass
class Parts:
    """Everything a workload contributes to a trainer."""

    model: nn.Module
    slots: tuple[str, str]
    blueprints: tuple[str, str]
    train: TensorDataset
    val: TensorDataset
    loss_fn: LossFn
    batch_size: int
    lr: float


# ---------------------------------------------------------------- mlp
def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn's digits (features / 16), 80/20 split. Read from sklearn's bundled file without importing
    sklearn, which costs ~1.5 s in every driver process."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the conformance workloads read scikit-learn's bundled digits: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as handle:
        data = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    x, y = torch.from_numpy(data[:, :-1] / 16.0), torch.from_numpy(data[:, -1].astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    val, train = order[: len(x) // 5], order[len(x) // 5:]
    return x[train], y[train], x[val], y[val]


def mlp_parts(seed: int) -> Parts:
    x_tr, y_tr, x_va, y_va = _digits()
    torch.manual_seed(seed)
    model = HostMLP(64, [32, 32], 10, dropout=0.1)
    hidden = default_slots(model)[1:3]
    return Parts(model, (hidden[0], hidden[1]), ("residual_mlp", "residual_mlp"), TensorDataset(x_tr, y_tr),
                 TensorDataset(x_va, y_va), nn.functional.cross_entropy, batch_size=128, lr=0.01)


# ---------------------------------------------------------------- cnn
class SmallCNN(nn.Module):
    """conv(1->8) + BatchNorm + ReLU [slot `conv.2`, (8, 8, 8)] -> pool -> dropout -> flat 128 -> 32 [slot `fc.2`]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.fc(self.drop(self.pool(self.conv(x))))))


def cnn_parts(seed: int) -> Parts:
    x_tr, y_tr, x_va, y_va = _digits()
    images = (x_tr.reshape(-1, 1, 8, 8), x_va.reshape(-1, 1, 8, 8))
    torch.manual_seed(seed)
    return Parts(SmallCNN(), ("conv.2", "fc.2"), ("conv_residual", "residual_mlp"), TensorDataset(images[0], y_tr),
                 TensorDataset(images[1], y_va), nn.functional.cross_entropy, batch_size=128, lr=0.01)


# ---------------------------------------------------------------- lm
CONTEXT = 16
CORPUS_CHARS = 4096


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP, both residual; output `[B, T, C]`."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # True = may not attend
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Token + position embeddings, `blocks.0`, `blocks.1`, a final norm and the vocabulary head."""

    def __init__(self, vocab: int, width: int = 32, layers: int = 2, heads: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(CONTEXT, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(width, heads, dropout) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.norm(self.blocks(self.drop(self.tok(idx) + self.pos(positions)))))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy over every position: `[B, T, V]` against `[B, T]`."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def char_corpus() -> tuple[torch.Tensor, int]:
    """The start of `json.decoder`'s source as character ids (read at test time: nothing is downloaded)."""
    text = inspect.getsource(json.decoder)[:CORPUS_CHARS]
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), len(vocab)


def lm_parts(seed: int) -> Parts:
    ids, vocab = char_corpus()
    windows = (len(ids) - 1) // CONTEXT
    x = ids[: windows * CONTEXT].reshape(windows, CONTEXT)
    y = ids[1: windows * CONTEXT + 1].reshape(windows, CONTEXT)
    n_val = windows // 10
    torch.manual_seed(seed)
    return Parts(TinyLM(vocab), ("blocks.0", "blocks.1"), ("residual_mlp", "residual_mlp"),
                 TensorDataset(x[n_val:], y[n_val:]), TensorDataset(x[:n_val], y[:n_val]), lm_loss,
                 batch_size=32, lr=0.01)


WORKLOADS: dict[str, Callable[[int], Parts]] = {"mlp": mlp_parts, "cnn": cnn_parts, "lm": lm_parts}


# ---------------------------------------------------------------- the trainer
def conformance_config(workload: str, *, epochs: int, seed: int, lr: float) -> TolariaConfig:
    """Every checkpoint kept; budgets and deadlines so wide that a loaded machine cannot change a decision
    (a breach would open a breaker, and conservative mode blocks germination). One CPU thread runs
    deterministic kernels, so `run.deterministic` (whose torch switch imports torch._dynamo, ~1.6 s
    in every driver process) stays off."""
    generous = 600_000.0
    return config_from_dict({
        "run": {"name": f"conformance-{workload}", "epochs": epochs, "seed": seed, "threads": 1,
                "deterministic": False},
        "optimizer": {"name": "adam", "lr": lr},
        "lr": {"warmup_steps": 5, "seed_warmup_steps": 2},
        "kasmina": {"min_training_steps": 2, "blend_steps": 4, "seed_hidden": 16, "fossilize_tolerance": 10.0},
        "checkpoint": {"enabled": True, "keep_last": 1000},
        "telemetry": {"jsonl": False, "step_interval": 0},
        "emergency": {"broadcast": False, "watchdog_s": generous},
        "boundary": {k: generous for k in ("state_assembly_ms", "tamiyo_ms", "apply_ms", "check_ms", "total_ms")},
        "handshake": {"tamiyo_timeout_s": generous / 1000},
        "growth": {"veto_unpaid_fossilize": False},  # the script's lifecycle is applied as written
    })


def build_trainer(workload: str, run_dir: Path, *, num_workers: int = 0, epochs: int = EPOCHS, seed: int = 0,
                  answered_file: Path | None = None, callbacks: Sequence[Any] = ()) -> TolariaTrainer:
    """A trainer for `workload` writing into `run_dir`; the train loader's batch sampler is resumable."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; use one of {sorted(WORKLOADS)}")
    parts = WORKLOADS[workload](seed)
    config = conformance_config(workload, epochs=epochs, seed=seed, lr=parts.lr)
    configure_torch(config)
    sampler = ResumableBatchSampler(len(parts.train), parts.batch_size, seed=seed)
    train = DataLoader(parts.train, batch_sampler=sampler, num_workers=num_workers)
    val = DataLoader(parts.val, batch_size=256, shuffle=False)
    kasmina = KasminaLayer(parts.model, list(parts.slots), config=KasminaConfig.model_validate(config.kasmina),
                           seed=seed, example_input=parts.val.tensors[0][:2])
    tamiyo = ScriptedTamiyo(parts.slots, parts.blueprints, answered_file=answered_file)
    lr = parts.lr
    return TolariaTrainer(kasmina=kasmina, tamiyo=tamiyo, optimizer=lambda groups: torch.optim.Adam(groups, lr=lr),
                          train_loader=train, val_loader=val, loss_fn=parts.loss_fn, config=config,
                          run_dir=run_dir, callbacks=callbacks)


def architecture(trainer: TolariaTrainer) -> list[tuple[str, str, str, str]]:
    """(seed id, slot, blueprint, stage) of every seed Kasmina knows, culled ones included."""
    seeds = trainer.kasmina.manifest()["seeds"]
    return sorted((s["seed_id"], s["slot"], s["blueprint"], s["stage"]) for s in seeds)
