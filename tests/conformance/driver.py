"""Run (or resume) one conformance workload in its own process, optionally crashing it on purpose.

    python tests/conformance/driver.py WORKLOAD RUN_DIR --result OUT.json [--resume]
        [--workers N] [--sigterm-at-step K] [--sigkill-at-step K [--sigkill-delay-s S]]
        [--crash-after-apply-epoch E] [--answered-file PATH]

The tests run `main` in processes forked from `driver.py --serve`, which has imported all of this
once (torch's import would otherwise cost seconds per run); the command line above is the same run.
Faults are real: `--sigterm-at-step`/`--sigkill-at-step` send the signal to this process when step
K ends (the checkpoint writer may be mid-write) or S seconds after it (anywhere);
`--crash-after-apply-epoch` calls `os._exit(9)` right after Kasmina applied the command of epoch E,
before that boundary's checkpoint. The production code is not touched: the faults are a callback
and a wrapper around Kasmina. On a normal exit (SIGTERM included) OUT.json gets the final state
hash and the architecture.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests/`, so `conformance` imports

import torch._dynamo  # noqa: E402, F401 - the first optimizer imports it (~1.6 s): load it in the fork server

from conformance.workloads import architecture, build_trainer  # noqa: E402
from esper.leyline import AdaptationCommand, is_noop  # noqa: E402
from esper.tolaria.loop.trainer import TolariaTrainer  # noqa: E402

CRASH_EXIT = 9


class SignalAtStep:
    """Sends `signum` to this process when global step `step` has finished, or `delay_s` later
    (from a timer thread, so it may land anywhere: in a step, a boundary, a checkpoint write)."""

    def __init__(self, step: int, signum: int, delay_s: float = 0.0) -> None:
        self.step, self.signum, self.delay_s = step, signum, delay_s

    def on_step_end(self, trainer: Any, step: int, loss: Any) -> None:
        if step != self.step:
            return
        if self.delay_s:
            timer = threading.Timer(self.delay_s, os.kill, (os.getpid(), self.signum))
            timer.daemon = True  # a run that ends first is not kept alive for it
            timer.start()
        else:
            os.kill(os.getpid(), self.signum)


def crash_after_apply(trainer: TolariaTrainer, epoch: int) -> None:
    """Make Kasmina's apply of epoch `epoch`'s (non-no-op) command end the process right after it succeeded."""
    apply = trainer.kasmina.apply_command

    def apply_then_crash(command: AdaptationCommand) -> Any:
        result = apply(command)
        if result.ok and trainer.state.epoch == epoch and not is_noop(command):
            os._exit(CRASH_EXIT)  # no cleanup, no checkpoint: as if the machine died here
        return result

    trainer.kasmina.apply_command = apply_then_crash  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--sigterm-at-step", type=int)
    parser.add_argument("--sigkill-at-step", type=int)
    parser.add_argument("--sigkill-delay-s", type=float, default=0.0)
    parser.add_argument("--crash-after-apply-epoch", type=int)
    parser.add_argument("--answered-file", type=Path)
    args = parser.parse_args(argv)

    callbacks = [SignalAtStep(step, signum, delay) for step, signum, delay in
                 ((args.sigterm_at_step, signal.SIGTERM, 0.0),
                  (args.sigkill_at_step, signal.SIGKILL, args.sigkill_delay_s)) if step is not None]
    trainer = build_trainer(args.workload, args.run_dir, num_workers=args.workers, callbacks=callbacks,
                            answered_file=args.answered_file)
    if args.crash_after_apply_epoch is not None:
        crash_after_apply(trainer, args.crash_after_apply_epoch)
    if args.resume:
        trainer.resume_from(args.run_dir / "checkpoints")
    result = trainer.fit()
    args.result.write_text(json.dumps({
        "final_state_sha256": trainer.final_state_sha256(), "architecture": architecture(trainer),
        "resumed_from": trainer.resumed_from, "stopped": result.summary["stopped"],
        "global_step": trainer.state.global_step, "epochs_completed": result.epochs_completed,
    }))
    return 0


def serve() -> int:
    """A fork server: everything above is imported once; each line on stdin is a JSON argv for
    `main`, run in a forked child whose output goes to the file named by `--log`. Answers
    `pid N` when the child started and `exit CODE` when it ended (CODE as `Popen.returncode`:
    -N when signal N ended it). The server itself never starts a thread, so forking it is safe."""
    for line in sys.stdin:
        argv, log = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(argv, log)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


def _child(argv: list[str], log: str) -> None:
    code = 1
    try:
        null, out = os.open(os.devnull, os.O_RDONLY), os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(null, 0)  # the server's requests are not this child's input
        os.dup2(out, 1)
        os.dup2(out, 2)
        code = main(argv)
    except BaseException:  # noqa: BLE001 - the child reports every failure through its log and exit code
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never return into the server's loop


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else main(sys.argv[1:]))
