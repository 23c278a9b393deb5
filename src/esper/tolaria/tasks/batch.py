"""Batches and model outputs of any structure: how a task reads what the loader and model give.

A batch is a tensor, a tuple or list, a dict (the Hugging Face convention) or a dataclass,
nested as the user likes. The rules, in one place:

- tensor: the model's only input, no target (a language model shifts it into inputs and targets);
- tuple/list: `(*inputs, target)`: the model is called `model(*inputs)`; one element is an input;
- dict or dataclass: the target is the first of `TARGET_KEYS` present; the model is called
  `model(**batch)`, without the target unless its `forward` takes that name (or `**kwargs`), so
  a model that computes its own loss from `labels` gets them.

An output is a tensor (the prediction), a tuple/list (its first element is the prediction), or an
object or dict with `logits` and/or `loss` (the Hugging Face convention). `move_batch` places every
tensor of a batch on a device, keeping the structure (a `PackedSequence` moves as torch moves it:
its `batch_sizes` stay on the CPU, where packing reads them).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

TARGET_KEYS = ("labels", "label", "targets", "target", "y")


class BatchError(TypeError):
    """A batch or model output has a structure no rule above covers; the message says which."""


@dataclass(frozen=True)
class SplitBatch:
    """A batch as a call: `model(*args, **kwargs)`, and the target (None: the batch has none)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    target: Any


def as_mapping(batch: Any) -> Mapping[str, Any] | None:
    """A dict batch, a dataclass batch as a dict of its fields (shallow), else None."""
    if isinstance(batch, Mapping):
        return batch
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return None


def split_batch(batch: Any, model: nn.Module | None = None, target_key: str | None = None) -> SplitBatch:
    """The call and target of `batch`; without `model` a dict's target stays among the keywords."""
    if isinstance(batch, torch.Tensor):
        return SplitBatch((batch,), {}, None)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise BatchError("an empty tuple/list batch: expected (inputs..., target)")
        if len(batch) == 1:
            return SplitBatch((batch[0],), {}, None)
        return SplitBatch(tuple(batch[:-1]), {}, batch[-1])
    mapping = as_mapping(batch)
    if mapping is None:
        raise BatchError(f"a batch of type {type(batch).__name__}: expected a tensor, a tuple/list "
                         "(inputs..., target), a dict or a dataclass")
    key = target_key if target_key is not None else next((k for k in TARGET_KEYS if k in mapping), None)
    if target_key is not None and target_key not in mapping:
        raise BatchError(f"the batch has no {target_key!r} (task_options.target_key); its keys: {sorted(mapping)}")
    kwargs = dict(mapping)
    if key is not None and model is not None and not takes_keyword(model, key):
        del kwargs[key]
    return SplitBatch((), kwargs, mapping[key] if key is not None else None)


_TAKES: dict[tuple[type, str], bool] = {}


def takes_keyword(model: nn.Module, name: str) -> bool:
    """Whether `model.forward` accepts `name` (or any keyword); cached per model class."""
    key = (type(model), name)
    if key not in _TAKES:
        params = inspect.signature(model.forward).parameters.values()
        _TAKES[key] = any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return _TAKES[key]


def prediction(output: Any) -> torch.Tensor:
    """The prediction tensor of a model output (logits for classifiers and language models)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = _field(output, "logits")
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise BatchError(f"the model returned {type(output).__name__}: expected a tensor, a tuple whose first element "
                     "is the prediction, or an object/dict with `logits`")


def model_loss(output: Any) -> torch.Tensor | None:
    """The loss a model computed itself (`output.loss` / `output["loss"]`), if any."""
    if isinstance(output, torch.Tensor):
        return None
    loss = _field(output, "loss")
    return loss if isinstance(loss, torch.Tensor) else None


def _field(output: Any, name: str) -> Any:
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None)


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in a (nested) structure, depth first, in order."""
    if isinstance(value, torch.Tensor):
        return value
    mapping = as_mapping(value)
    items = mapping.values() if mapping is not None else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def rows(split: SplitBatch) -> int:
    """Samples in the batch: the target's first dimension, else the first input tensor's."""
    tensor = split.target if isinstance(split.target, torch.Tensor) else first_tensor((split.args, split.kwargs))
    if tensor is None or tensor.dim() == 0:
        raise BatchError("the batch holds no batched tensor: cannot tell its size")
    return int(tensor.shape[0])


def move_batch(batch: Any, device: torch.device, *, non_blocking: bool = False) -> Any:
    """`batch` with every tensor on `device` (same structure; dataclasses are rebuilt with replace)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, PackedSequence):  # its own rule: batch_sizes stay on the CPU
        # its stub copies only the first overload of Tensor.to (a dtype); it takes a device as Tensor.to does
        return batch.to(device, non_blocking=non_blocking)  # type: ignore[arg-type]
    if isinstance(batch, (tuple, list)):
        moved = [move_batch(b, device, non_blocking=non_blocking) for b in batch]
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
            return type(batch)(*moved)
        return type(batch)(moved)
    if isinstance(batch, Mapping):
        moved_items = {k: move_batch(v, device, non_blocking=non_blocking) for k, v in batch.items()}
        return moved_items if type(batch) is dict else type(batch)(moved_items)  # type: ignore[call-arg]
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {f.name: move_batch(getattr(batch, f.name), device, non_blocking=non_blocking)
                   for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **changes)
    return batch
