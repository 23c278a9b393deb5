"""Claiming a run directory for `tolaria run` / `tolaria resume` without harming an existing run.

Rules (README, "Commands"):
- `new` needs RUN_DIR absent or empty; a folder that holds anything is refused, naming
  `--resume` (continue it) and `--overwrite` (replace it). A RUN_DIR that is a file is refused.
- `continue` needs RUN_DIR to hold a run (`config.json` or `checkpoints/`).
- Nothing of an existing run is touched until the new run has been built: `overwrite` moves the
  old run aside with one rename and builds into a fresh folder; `commit()` (the build succeeded)
  deletes the old run, `abort()` (it failed) removes what the build made and puts the old run
  back. A failed `new` start removes what it made, so an empty or absent RUN_DIR stays so.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Mode = Literal["new", "continue", "overwrite"]


class RunDirError(ValueError):
    """RUN_DIR cannot be used as asked; the message names the problem and the flag that fixes it."""


def holds_run(run_dir: Path) -> bool:
    return (run_dir / "config.json").is_file() or (run_dir / "checkpoints").is_dir()


@dataclass
class RunDirClaim:
    run_dir: Path
    mode: Mode
    created: bool = False  # RUN_DIR did not exist before this claim
    aside: Path | None = None  # where the replaced run waits until commit()

    @classmethod
    def open(cls, run_dir: Path, mode: Mode) -> RunDirClaim:
        """Check RUN_DIR against `mode` and prepare it; raises `RunDirError` before touching anything."""
        if run_dir.exists() and not run_dir.is_dir():
            raise RunDirError(f"--run-dir {run_dir} is a file, not a directory: pass a folder for the run")
        occupied = run_dir.is_dir() and any(run_dir.iterdir())
        if mode == "continue":
            if not holds_run(run_dir):
                raise RunDirError(f"{run_dir} holds no run to continue (no config.json or checkpoints/): "
                                  f"is it a run directory written by `tolaria run`? drop --resume to start one")
            return cls(run_dir, mode)
        if occupied and mode == "new":
            raise RunDirError(f"--run-dir {run_dir} already holds files (a previous run?): pass --resume to "
                              f"continue it or --overwrite to replace it, or choose another --run-dir")
        claim = cls(run_dir, mode, created=not run_dir.exists())
        if occupied:
            claim.aside = _move_aside(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return claim

    def commit(self) -> None:
        """The new run is built: the replaced run (if any) is deleted for good."""
        if self.aside is not None:
            shutil.rmtree(self.aside)
            self.aside = None

    def abort(self) -> None:
        """The start failed: leave RUN_DIR as it was found."""
        if self.mode == "continue":
            return
        if self.created or self.aside is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:
            _empty(self.run_dir)  # it existed, empty
        if self.aside is not None:
            os.replace(self.aside, self.run_dir)
            self.aside = None


def _move_aside(run_dir: Path) -> Path:
    resolved = run_dir.resolve()
    if Path.cwd().resolve().is_relative_to(resolved):
        raise RunDirError(f"--overwrite {run_dir}: it is (or holds) the current directory; run from elsewhere "
                          f"or pass a subfolder as --run-dir")
    aside = resolved.with_name(f".{resolved.name}.replaced-{os.getpid()}")
    try:
        os.replace(resolved, aside)
    except OSError as exc:
        raise RunDirError(f"--overwrite {run_dir}: cannot move the old run aside ({exc}); remove it yourself "
                          f"or choose another --run-dir") from exc
    return aside


def _empty(directory: Path) -> None:
    for path in directory.iterdir():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
