"""No host-device synchronisation in a steady-state step on CUDA: after a warm-up, every step of a
real run (through `fit()`, with the checks that may read back put on check steps only) runs under
`torch.cuda.set_sync_debug_mode("error")`, which raises at any synchronising call."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from esper.tolaria.loop.build import build_trainer
from gpu.jobs import cuda_config

pytestmark = pytest.mark.gpu

WARM_UP_STEPS = 3  # the first gradient check (step 0), kernels chosen, allocator pools filled


class SyncFreeSteps:
    """A callback that turns CUDA's sync debugging to "error" inside each step after the warm-up
    (between STEP_BEGIN and STEP_END: the loop's own reads between steps are not the step's)."""

    def __init__(self) -> None:
        self.checked = 0

    def on_step_begin(self, trainer: Any, step: int) -> None:
        if step >= WARM_UP_STEPS:
            torch.cuda.set_sync_debug_mode("error")
            self.checked += 1

    def on_step_end(self, trainer: Any, step: int, loss: Any = None) -> None:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_steady_state_steps_never_synchronise_with_the_host(precision: str) -> None:
    config = cuda_config(
        run={"epochs": 3, "precision": precision, "morphogenesis": False, "loss_readback": "deferred"},
        telemetry={"jsonl": False, "step_interval": 0},  # no per-step telemetry read
        emergency={"broadcast": False, "grad_check_every": 1_000_000},  # the gradient read: step 0 only
    )
    steps = SyncFreeSteps()
    trainer = build_trainer(config, callbacks=(steps,))
    try:
        result = trainer.fit()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert result.epochs_completed == 3
    assert steps.checked >= 3 * 30  # digits: ~39 steps an epoch, all after the warm-up checked
    assert result.summary["precision"]["device"].startswith("cuda")
