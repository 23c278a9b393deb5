"""A fast rollback's copy plan, made when the snapshot is taken.

Restoring a snapshot in place means pairing every live tensor (parameters, persistent buffers,
optimizer state) with its clone in the snapshot. Done at rollback time, that pairing walks
`state_dict()` twice: ~50 µs warm for a small model and several times that right after training
has flushed the CPU caches, as much as copying a 1M-parameter model. So it is done once, when the
snapshot is taken, and kept as a `RestorePlan` of weak references.

At rollback the plan is *resolved* in O(tensors), without walking the model. It is used only if

- the optimizer is the very object the plan was made with: Tolaria rebuilds the optimizer on
  every structural change (germination, fossilization, cull, structure restore) and on every
  optimizer `load_state_dict`, so the same optimizer means the same trainable parameter set;
- the optimizer holds state for as many parameters as then (no lazy state created since);
- every paired tensor is still alive and has its shape (a cull frees them; nothing is reshaped).

Otherwise the caller restores by name. The snapshot's tensors are host buffers (pinned for a CUDA
model): the planned copy is then host to device on the copy engine's side stream, ordered before
the next kernel of the current stream (`copy_in_place_`), and the confirm's sampled read-back is
what first waits for it. Weak references never keep a culled parameter alive nor
block the cache from recycling an evicted snapshot's buffers.

Contract: the model's `state_dict()` keys are its modules' parameter and persistent-buffer names
(no custom state-dict hooks), buffers are updated in place (as BatchNorm does), and only Kasmina
changes the structure. A model whose state dict does not match the walk gets no plan (`build`
returns None) and the by-name restore.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def gather_named(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[tuple[str, ...], Any]] | None:
    """Live tensors as (path into the snapshot, tensor); None if the optimizer state holds a
    non-tensor value (the copy alone could not restore it) or its groups are not named."""
    out: list[tuple[tuple[str, ...], Any]] = []
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, p in module._parameters.items():
            if p is not None:
                out.append((("model", dot + name), p))
        skip = module._non_persistent_buffers_set
        for name, b in module._buffers.items():
            if b is not None and name not in skip:
                out.append((("model", dot + name), b))
    for group in optimizer.param_groups:
        names = group.get("param_names")
        if names is None:
            return None
        for pname, p in zip(names, group["params"], strict=True):
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    return None
                out.append((("optimizer", pname, key), value))
    return out


class RestorePlan:
    """Weak (live tensor, snapshot tensor) pairs, and the optimizer they were paired under."""

    __slots__ = ("_optimizer", "_n_state", "_dst", "_src", "_shapes")

    def __init__(self, optimizer: torch.optim.Optimizer, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        self._optimizer = weakref.ref(optimizer)
        self._n_state = len(optimizer.state)
        self._dst = [weakref.ref(t) for t in dst]
        self._src = [weakref.ref(t) for t in src]
        self._shapes = [t.shape for t in dst]

    def __len__(self) -> int:
        return len(self._dst)

    @classmethod
    def build(cls, model: nn.Module, optimizer: torch.optim.Optimizer,
              state: Mapping[str, Any]) -> RestorePlan | None:
        """Pair the live tensors with `state`'s (a snapshot's cloned `model` and by-name
        `optimizer` sections); None if they do not correspond one to one."""
        named = gather_named(model, optimizer)
        model_state, optim_state = state.get("model"), (state.get("optimizer") or {}).get("state")
        if named is None or not isinstance(model_state, Mapping) or not isinstance(optim_state, Mapping):
            return None
        dst, src = [], []
        for path, live in named:
            saved = model_state.get(path[1]) if path[0] == "model" else optim_state.get(path[1], {}).get(path[2])
            if not isinstance(saved, torch.Tensor) or (saved.shape, saved.dtype) != (live.shape, live.dtype):
                return None
            dst.append(live)
            src.append(saved)
        n_model = sum(1 for path, _ in named if path[0] == "model")
        n_optim = sum(len(entry) for entry in optim_state.values())
        if n_model != len(model_state) or n_model + n_optim != len(named):
            return None  # the snapshot holds tensors this walk does not reach (e.g. state-dict hooks)
        return cls(optimizer, dst, src)

    def resolve(self, optimizer: torch.optim.Optimizer) -> tuple[list[Any], list[Any]] | None:
        """(live, snapshot) tensor lists to copy, or None if the structure changed since."""
        if self._optimizer() is not optimizer or len(optimizer.state) != self._n_state:
            return None
        dst = [ref() for ref in self._dst]
        src = [ref() for ref in self._src]
        for live, saved, shape in zip(dst, src, self._shapes, strict=True):
            if live is None or saved is None or live.shape != shape:
                return None
        return dst, src
