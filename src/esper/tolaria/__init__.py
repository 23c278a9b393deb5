"""Tolaria: the training orchestrator.

    loop/        the run: trainer (fit, epoch, step), boundary, handshake, hooks, wiring, build
    recovery/    snapshots, copy-behind, rollback, restore plans, monitors, emergency protocol, signal
    checkpoint/  durable checkpoints: atomic files, the WAL, the command journal, recovery, inspection
    control/     LR controller, optimizer rebuilds, gradient aggregation, breakers, conservative mode
    observe/     run log, telemetry, timing, profiling, exporters, progress, summary, report
    state/       what a snapshot is: the registry of stateful components, RNG state, the position
    drills.py    fault drills (wrappers and hook callbacks); cli.py, job.py: the commands

Imports point down this list and never up: `loop` may import everything; `recovery` imports
`checkpoint`, `control`, `observe` and `state`; `checkpoint` imports `state`; `control`,
`observe` and `state` import none of the others but `state` (and `observe` the checkpoint's
atomic write). Shared leaves (`config`, `distributed`, `data`, `models`, `run_dir`) import no
package above. tests/test_import_direction.py holds every rule.
"""
