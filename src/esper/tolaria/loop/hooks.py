"""Named points of the training loop where components are called.

The loop, in pseudocode (`TolariaTrainer.fit`):

    FIT_BEGIN                      restore from checkpoint if resuming; start telemetry, watchdog
    for epoch in epochs:
        EPOCH_BEGIN                position the sampler (resume mid-epoch, skip recorded batches)
        for batch in train loader:
            STEP_BEGIN             watchdog heartbeat
            forward → host loss; Kasmina seed losses on detached activations
            aggregator.backward    L = L_host + Σ w_i (b_i/b_host) L_i, PCGrad etc., clipping
            monitors               NaN/Inf, loss spike → emergency protocol (may roll back)
            LR controller step → optimizer step (skipped when non-finite)
            Kasmina.on_step        advance α ramps
            STEP_END               step telemetry (every N steps), step snapshots (every N steps)
        BOUNDARY_BEGIN             after the last snapshot's copy-behind settled: weights may be written
            validate (outside the 18 ms budget)
            state assembly → Tamiyo (deadline, fallback) → verify + apply (optimizer rebuild)
            → BOUNDARY_CHECK (inside the check phase and its budget)
            → check timings, breakers, conservative mode → snapshot cache + async checkpoint
        BOUNDARY_END               epoch telemetry, history, exporters
    FIT_END                        then: checkpoints and telemetry flushed, the summary built, and
                                   only then every component closed
"""

from __future__ import annotations

from enum import StrEnum


class HookPoint(StrEnum):
    FIT_BEGIN = "on_fit_begin"
    EPOCH_BEGIN = "on_epoch_begin"
    STEP_BEGIN = "on_step_begin"
    STEP_END = "on_step_end"
    BOUNDARY_BEGIN = "on_boundary_begin"
    BOUNDARY_CHECK = "on_boundary_check"
    BOUNDARY_END = "on_boundary_end"
    FIT_END = "on_fit_end"
