"""Capture and restore the complete training state (the content of a `Snapshot`).

Order matters on restore: Kasmina's structure first (so a grown model has its seed modules),
then weights, then the optimizer (rebuilt for that structure, state loaded by parameter name),
then the LR controller (which re-writes every group's LR), then the rest.
"""

from __future__ import annotations

import ctypes
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from esper.tolaria.state.snapshot import Snapshot, deep_clone

if TYPE_CHECKING:
    from esper.tolaria.loop.trainer import TolariaTrainer

# Records of what happened stay when a rollback restores an earlier state; a resume restores them.
RECORD_KEYS = ("rollbacks", "emergencies", "fallbacks", "apply_failures")


def rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """The global RNGs (CUDA's per device once CUDA is in use) and a DataLoader's own generator."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "cuda": _cuda_rng_states()}
    if loader_generator is not None and loader_generator is not torch.default_generator:
        state["loader"] = loader_generator.get_state()
    return state


def set_rng_state(state: Mapping[str, Any], loader_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if not _NUMPY_PROBE.holds(state["numpy"]):
        np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    _set_cuda_rng_states(state.get("cuda") or [])
    if loader_generator is not None and state.get("loader") is not None:
        loader_generator.set_state(state["loader"])


def _cuda_rng_states() -> list[torch.Tensor]:
    # Read only once CUDA is initialized: reading initializes it (a context on every GPU, even for
    # a CPU run), and until then the CUDA generators hold only the seed `torch.manual_seed` queued,
    # which a resumed run queues alike.
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return []
    return list(torch.cuda.get_rng_state_all())


def _set_cuda_rng_states(states: list[torch.Tensor]) -> None:
    if not states or not torch.cuda.is_available():
        return  # resumed without CUDA: nothing here draws from a CUDA generator
    # Devices both runs have (a resume that sees other GPUs cannot be exact for the rest anyway).
    for device, saved in enumerate(states[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(saved, device)


def loader_generator(loader: Any) -> torch.Generator:
    """The generator a new iterator of `loader` draws its base seed from: its own, else torch's global one."""
    generator = getattr(loader, "generator", None)
    return generator if isinstance(generator, torch.Generator) else torch.default_generator


class _NumpyStateProbe:
    """Tells in ~1 µs whether numpy's global generator is already in a saved legacy state.

    `np.random.set_state` costs ~50 µs (it converts 624 words through Python), as much as the
    rest of a fast rollback's bookkeeping together, and a rollback usually follows training that
    drew nothing from numpy. The probe reads the MT19937 words and position through numpy's
    documented `BitGenerator.ctypes.state_address`; equal words and position mean no draw happened
    since the save (a Gaussian draw advances them too), so set_state would change nothing. If the
    raw view ever disagrees with `get_state()` when made, the probe turns itself off."""

    _WORDS = 624

    def __init__(self) -> None:
        self._view: np.ndarray | None = None
        try:
            bitgen = np.random.mtrand._rand._bit_generator
            raw = (ctypes.c_uint32 * (self._WORDS + 1)).from_address(bitgen.ctypes.state_address)
            view = np.ctypeslib.as_array(raw)
            _, key, pos, *_ = np.random.get_state()
            if view[: self._WORDS].tobytes() == np.asarray(key, dtype=np.uint32).tobytes() and int(view[-1]) == pos:
                self._view = view
                self._owner = bitgen  # keeps the generator (and so the address) alive
        except (AttributeError, TypeError, ValueError):
            self._view = None

    def holds(self, saved: Any) -> bool:
        view = self._view
        if view is None or saved[0] != "MT19937":
            return False
        return int(view[-1]) == int(saved[2]) and \
            view[: self._WORDS].tobytes() == np.asarray(saved[1], dtype=np.uint32).tobytes()


_NUMPY_PROBE = _NumpyStateProbe()


def _optional_state(component: Any) -> Any:
    fn = getattr(component, "state_dict", None)
    return fn() if fn is not None else None


def capture_state(t: TolariaTrainer) -> dict[str, Any]:
    """Everything needed to continue bit-for-bit from this point, with tensors cloned."""
    return deep_clone(live_state(t))  # type: ignore[no-any-return]


def live_state(t: TolariaTrainer) -> dict[str, Any]:
    """The same sections as `capture_state`, holding the *live* tensors: clone before keeping it."""
    return {
        "model": t.model.state_dict(),
        "kasmina": t.kasmina.state_dict(),
        "optimizer": t.optim.state_dict(),
        "lr": t.lr.state_dict(),
        "aggregator": t.aggregator.state_dict(),
        "breakers": t.breakers.state_dict(),
        "conservative": t.conservative.state_dict(),
        "tamiyo": _optional_state(t.tamiyo),
        "monitors": t.safety.monitors_state() if t.safety is not None else None,
        "rng": rng_state(loader_generator(t.train_loader)),
        "iterator_rng": t.iterator_rng,  # what this epoch's data iterator was built from
        "data": _optional_state(t.sampler),
        "trainer": {
            "epoch": t.state.epoch, "batch_in_epoch": t.state.batch_in_epoch, "global_step": t.state.global_step,
            "history": t.history, "seed_history": t.seed_history, "seed_stage": t._seed_stage,
            "config_sha256": t.config.sha256(), "run_id": t.run_id,
            **{k: getattr(t, k) for k in RECORD_KEYS},
            "emergencies": t.safety.emergency_records(),
        },
    }


def take_snapshot(t: TolariaTrainer, snapshot_id: str) -> Snapshot:
    return Snapshot(snapshot_id=snapshot_id, epoch=t.state.epoch, global_step=t.state.global_step,
                    state=capture_state(t))


def restore_state(t: TolariaTrainer, state: Mapping[str, Any], *, keep_records: bool, structure: bool = True) -> None:
    """Make the trainer's state that of `state`. `keep_records`: a rollback keeps its incident lists.

    Sections missing from `state` are left alone (a fast rollback has already copied the
    tensors in place and passes only the rest); `structure=False` skips Kasmina, weights and
    the optimizer rebuild."""
    if structure:
        if "kasmina" in state:
            t.kasmina.load_state_dict(state["kasmina"])  # structure first
        t.model.load_state_dict(state["model"])
        t.optim.load_state_dict(state["optimizer"])
    t.lr.load_state_dict(state["lr"])
    t.lr.refresh()
    t.aggregator.load_state_dict(state["aggregator"])
    t.breakers.load_state_dict(state["breakers"])
    t.conservative.load_state_dict(state["conservative"])
    if state.get("tamiyo") is not None and hasattr(t.tamiyo, "load_state_dict"):
        t.tamiyo.load_state_dict(state["tamiyo"])
    if state.get("monitors") is not None and t.safety is not None:
        t.safety.load_monitors_state(state["monitors"])
    if state.get("data") is not None and t.sampler is not None:
        skipped = set(t.sampler.skipped)
        t.sampler.load_state_dict(state["data"])
        if keep_records:  # batches skipped by earlier rollbacks stay skipped, whatever the target knew
            t.sampler.skipped |= skipped
    set_rng_state(state["rng"], loader_generator(t.train_loader))
    if "iterator_rng" in state:
        t.iterator_rng = deep_clone(state["iterator_rng"])  # not the snapshot's tensor: its buffer is reused
    _restore_trainer_counters(t, state["trainer"], keep_records=keep_records)


def _restore_trainer_counters(t: TolariaTrainer, saved: Mapping[str, Any], *, keep_records: bool) -> None:
    t.state.epoch = saved["epoch"]
    t.state.batch_in_epoch = saved["batch_in_epoch"]
    t.state.global_step = saved["global_step"]
    t.history = [dict(h) for h in saved["history"]]
    t.seed_history = {k: [dict(x) for x in v] for k, v in saved["seed_history"].items()}
    t._seed_stage = dict(saved["seed_stage"])
    if not keep_records:
        for key in RECORD_KEYS:
            setattr(t, key, [dict(x) for x in saved.get(key, [])])
