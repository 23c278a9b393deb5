"""The models and data of the shipped examples (`examples/digits_cnn.toml`, `examples/text_lm.toml`).

Named from a config as `model.factory = "esper.tolaria.zoo:digits_cnn"` and
`data.factory = "esper.tolaria.zoo:digits_images"`, like any user code. Nothing here is downloaded:
the digits come with scikit-learn, the text with Python. A leaf module: torch, numpy and the
standard library only, so the examples exercise exactly the path a user's own factories take.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

# ---------------------------------------------------------------- digits as images


def _digits_csv() -> Path:
    """scikit-learn's bundled digits file, found without importing sklearn (an import costs ~1.5 s)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the digits examples read scikit-learn's bundled digits: pip install scikit-learn")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"


def digits_images(val_fraction: float = 0.2, split_seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) of the 1,797 digits as `[1, 8, 8]` float images in [0, 1] with int64 labels,
    split at random by `split_seed` (the split is the data's, independent of the run's seed)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    with gzip.open(_digits_csv(), "rt") as handle:
        data = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(data[:, :-1] / 16.0).reshape(-1, 1, 8, 8)  # pixel counts run 0..16
    labels = torch.from_numpy(data[:, -1].astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(split_seed).permutation(len(labels)))
    n_val = int(round(len(labels) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


# ---------------------------------------------------------------- a small CNN


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Conv3x3 -> BatchNorm -> ReLU; the ReLU (index 2) is the block's seed slot."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class DigitsCNN(nn.Module):
    """Two conv blocks and a hidden FC layer for `[B, 1, 8, 8]` digits; logits `[B, classes]`.

    Seed slots (module names) and their per-sample activation shapes:
    `conv1.2` (c1, 8, 8), `conv2.2` (c2, 4, 4), `fc.1` (hidden,). Dropout follows the FC layer,
    so a seed at `fc.1` is regularised like the host.
    """

    def __init__(self, channels: Sequence[int] = (8, 16), hidden: int = 32, dropout: float = 0.2,
                 classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = _conv_block(1, c1)
        self.conv2 = _conv_block(c1, c2)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 2 * 2, hidden), nn.ReLU())
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(x))  # 8x8 -> 4x4
        x = self.pool(self.conv2(x))  # 4x4 -> 2x2
        return self.head(self.drop(self.fc(x)))


def digits_cnn(**kwargs: Any) -> DigitsCNN:
    """model.factory of examples/digits_cnn.toml: `DigitsCNN(**[model.kwargs])`."""
    return DigitsCNN(**kwargs)


# ---------------------------------------------------------------- Python's own source as a byte corpus

CORPUS_MODULES = (
    "json.decoder", "json.encoder", "textwrap", "string", "shlex", "heapq", "bisect", "queue", "sched",
    "graphlib", "copy", "colorsys", "contextlib", "fractions", "calendar", "functools", "dataclasses",
)
"""Pure-Python standard-library modules (317 KB of source on Python 3.11)."""


def _module_source(name: str) -> bytes:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise RuntimeError(f"standard-library module {name!r} has no .py source on this Python; "
                           "pass data.kwargs.modules naming modules that do")
    return Path(spec.origin).read_bytes()


class TokenWindows(Dataset[torch.Tensor]):
    """Windows of `context + 1` byte tokens (int64), starting every `stride` bytes: a batch is a
    `[B, context + 1]` tensor that the language_model task shifts into inputs and targets.

    `sha256` and `size_bytes` name the text the windows were cut from.
    """

    def __init__(self, tokens: torch.Tensor, context: int, stride: int) -> None:
        if context < 1 or stride < 1:
            raise ValueError(f"context and stride must be >= 1, got {context} and {stride}")
        if len(tokens) < context + 1:
            raise ValueError(f"{len(tokens)} tokens cannot fill one window of {context + 1}")
        self.tokens, self.context, self.stride = tokens, context, stride
        raw = tokens.numpy().tobytes()
        self.sha256, self.size_bytes = hashlib.sha256(raw).hexdigest(), len(raw)

    def __len__(self) -> int:
        return (len(self.tokens) - self.context - 1) // self.stride + 1

    def __getitem__(self, index: int) -> torch.Tensor:
        start = index * self.stride
        return self.tokens[start:start + self.context + 1].long()  # stored as uint8: 8x less memory


def python_source_text(modules: Sequence[str] = CORPUS_MODULES, context: int = 64, stride: int = 96,
                       val_fraction: float = 0.1) -> tuple[TokenWindows, TokenWindows]:
    """(train, val) byte-level windows of the source files of `modules` (vocabulary: the 256 bytes).

    Why Python's own source: it is on every machine that runs Tolaria (no download, no data set
    licence to check) and it is real text with structure (indentation, names, docstrings) that a
    small transformer learns visibly within minutes. Each module's last `val_fraction` of bytes is
    held out, so validation covers every module and no window crosses the split. Training windows
    start every `stride` bytes (a stride above `context` skips bytes: a shorter epoch); validation
    windows do not overlap.

    The text differs slightly between Python versions: compare runs by the datasets' `sha256` and
    `size_bytes`. On CPython 3.11.7 with the default modules: train 285,753 bytes (sha256
    da6d7466...5daf76), val 31,743 bytes (sha256 209c3c79...3f2dd70).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train, val = bytearray(), bytearray()
    for name in modules:
        source = _module_source(name)
        cut = len(source) - int(len(source) * val_fraction)
        train += source[:cut]
        val += source[cut:]
    return TokenWindows(_tokens(train), context, stride), TokenWindows(_tokens(val), context, context)


def _tokens(data: bytearray) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(bytes(data), dtype=np.uint8).copy())  # a writable copy


# ---------------------------------------------------------------- a small causal transformer


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t only."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()  # True: may attend
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.out(mixed.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)); output `[B, T, C]`."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A byte/character language model: token and position embeddings, `blocks.0` ... `blocks.{layers-1}`
    (the seed slots, each `[B, T, width]`), a final LayerNorm and the vocabulary head.

    Input `[B, T]` token ids with T <= context; output logits `[B, T, vocab]`.
    """

    def __init__(self, vocab: int = 256, width: int = 64, layers: int = 2, heads: int = 4, context: int = 64,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.context = context
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(width, heads, dropout) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[1] > self.context:
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds the model's context {self.context}")
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.norm(self.blocks(self.drop(self.tok(idx) + self.pos(positions)))))


def char_lm(**kwargs: Any) -> CharTransformer:
    """model.factory of examples/text_lm.toml: `CharTransformer(**[model.kwargs])`."""
    return CharTransformer(**kwargs)
