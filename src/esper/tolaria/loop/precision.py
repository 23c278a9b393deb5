"""The device and precision layer: where the model and batches live, autocast, loss scaling.

`run.device` is `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`. `run.precision`:
`fp32` (no autocast), `bf16` (autocast, no scaling: bf16 has fp32's range), `fp16` (autocast and
a `torch.amp.GradScaler`). A step whose scaled gradients overflow is the scaler's business: it is
skipped and the scale lowered (counted as `overflow_steps`), never an incident. The scaler's
state is part of every snapshot, so a resume continues with the same scale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_NO_AUTOCAST = contextlib.nullcontext()


def resolve_device(spec: str, world_size: int = 1) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda`/`cuda:N` need CUDA and say so. Under torchrun
    `cuda` is the rank's own GPU (bound from LOCAL_RANK), and an index would put every rank on one."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and device.index is not None and world_size > 1:
        raise ValueError(f"run.device = {spec!r} under torchrun would put all {world_size} ranks on GPU "
                         f"{device.index}: use 'cuda' or 'auto' (each rank trains on its LOCAL_RANK GPU)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"run.device = {spec!r} but torch sees no CUDA device: use run.device = 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"run.device = {spec!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


class Precision:
    """Autocast for the forward passes and, for fp16, the loss scaler around the backward."""

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode, self.device = mode, device
        self.dtype = _DTYPES.get(mode)
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
        self.overflow_steps = 0

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward's context: torch.autocast, or a shared no-op for fp32 (cheap on every step)."""
        if self.dtype is None:
            return _NO_AUTOCAST
        return torch.autocast(self.device.type, dtype=self.dtype)

    def loss_transform(self, weight: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What a loss becomes before its backward: x `weight` (a micro-batch's share of the step), scaled
        by the scaler; None when it stays as it is (the plain step)."""
        scaler = self.scaler
        if scaler is None:
            return None if weight == 1.0 else (lambda loss: loss * weight)
        if weight == 1.0:
            return scaler.scale
        return lambda loss: scaler.scale(loss * weight)

    def step(self, optimizer: torch.optim.Optimizer, *, finite: bool, overflow: bool) -> None:
        """The optimizer step when the gradient is finite (through the scaler, which skips it if its
        own check found an overflow), the scaler's update, and the gradients cleared for the next."""
        scaler = self.scaler
        if finite:
            optimizer.step() if scaler is None else scaler.step(optimizer)
        elif overflow:
            self.overflow_steps += 1
        if scaler is not None:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def summary(self) -> dict[str, Any]:
        scale = self.scaler.get_scale() if self.scaler is not None else None
        return {"precision": self.mode, "device": str(self.device), "loss_scale": scale,
                "overflow_steps": self.overflow_steps}

    def state_dict(self) -> dict[str, Any]:
        scaler = self.scaler.state_dict() if self.scaler is not None else {}
        return {"scaler": scaler, "overflow_steps": self.overflow_steps}

    def load_state_dict(self, state: Any) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.overflow_steps = int(state.get("overflow_steps", 0))
