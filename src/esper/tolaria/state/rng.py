"""The random-number state a snapshot carries: the global generators (CUDA's per device once CUDA
is in use) and a DataLoader's own generator, with a fast check that skips numpy's costly restore."""

from __future__ import annotations

import ctypes
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


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


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (CUDA's with torch's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
