"""`run.compile`: torch.compile of the host model's forward, kept right while Kasmina grows it.

Contract:

- `compile_host(model, setting)` compiles `model` in place (`nn.Module.compile`): calling the
  module runs the compiled graph, and the module, its parameters and its `state_dict()` keys stay
  the uncompiled ones (no `_orig_mod.` prefix), so optimizers built over its parameters still hold
  them and checkpoints move freely between compiled and eager runs. `setting` is `run.compile`:
  False (returns None), True (torch's default mode) or a mode name.
- Seeds are forward hooks on the host's modules (Kasmina). By default dynamo does not guard on a
  module's hooks (`skip_nnmodule_hook_guards`), so a graph compiled before a germination would go
  on running without the seed, silently. Compiling turns those guards on (a process-wide dynamo
  setting; it only makes guards stricter): a graph is reused only while the hooks it traced are
  the hooks the modules have.
- `HostCompile.structure_changed()` is called after Kasmina changes the model (a command applied,
  a rollback or resume that rebuilt seeds). It drops every compiled graph (`torch.compiler.reset`,
  process-wide: no per-module reset exists) so that the next forward compiles once for the new
  structure and graphs of structures gone by never pile up against dynamo's recompile limit (past
  it, dynamo would fall back to eager without a word). Between changes nothing recompiles: a
  blending seed's alpha is a buffer, read as a tensor.
- `RecompileOnGrowth` is the trainer's callback that calls it: at fit begin (a resume rebuilt the
  seeds), at each epoch begin (a rollback restored other seeds) and at each boundary end (a command
  changed them) it compares `loop.structure.structure_key` with the last one it saw.
- Modes other than the default apply to the inductor backend only; a test passes `backend="eager"`
  or `"aot_eager"`, which need no compiler.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class HostCompile:
    """The compiled host; `resets` counts the structure changes that dropped its graphs."""

    model: nn.Module
    mode: str
    backend: str
    resets: int = 0

    def structure_changed(self) -> None:
        """Drop the compiled graphs: the next forward compiles for the model as it is now."""
        torch.compiler.reset()
        self.resets += 1

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, "backend": self.backend, "structure_resets": self.resets}


def compile_host(model: nn.Module, setting: bool | str, *, backend: str = "inductor") -> HostCompile | None:
    """Compile `model`'s forward in place per `run.compile` (see the module docstring); None when off."""
    if setting is False:
        return None
    mode = "default" if setting is True else str(setting)
    if mode not in MODES:
        raise ValueError(f"run.compile = {setting!r} is not a torch.compile mode: use false, true or one of "
                         f"{', '.join(MODES)}")
    if mode != "default" and backend != "inductor":
        raise ValueError(f"run.compile = {mode!r} is a mode of the inductor backend, not of {backend!r}: "
                         "use run.compile = true with that backend")
    import torch._dynamo

    torch._dynamo.config.skip_nnmodule_hook_guards = False  # seeds are hooks: a graph must see them
    model.compile(backend=backend, mode=None if mode == "default" else mode)
    return HostCompile(model, mode, backend)


class RecompileOnGrowth:
    """Trainer callback: `structure_changed()` whenever the seeds' structure key differs from the last
    one seen (see the module docstring for when it looks). A graph stays valid across alpha changes,
    so looking costs no recompile."""

    def __init__(self, compiled: HostCompile, structure: Callable[[], Hashable]) -> None:
        self.compiled, self._structure = compiled, structure
        self._key = structure()

    def _look(self, *_: Any, **__: Any) -> None:
        key = self._structure()
        if key != self._key:
            self._key = key
            self.compiled.structure_changed()

    on_fit_begin = on_epoch_begin = on_boundary_end = _look
