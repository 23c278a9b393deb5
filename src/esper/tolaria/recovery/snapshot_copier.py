"""Copy-behind on the CPU: a snapshot's bulk tensor copy runs on a background thread.

Parameters and optimizer state change only when the optimizer steps (or a rollback or the
boundary writes them). So at a snapshot the trainer clones the small, forward-mutated parts
(buffers such as BatchNorm statistics, plain values) at once and hands the rest to this copier;
the next step's data loading, forward and backward run while it copies. The trainer settles
(waits for the job) right before anything writes those tensors: the optimizer step, a rollback,
the next boundary. With a forward and backward longer than the copy, the wait is zero.

One job at a time, in order, on one daemon thread started on first use. `torch._foreach_copy_`
releases the GIL, so the copy really runs beside the training thread. This is the CPU
implementation of the copy-engine contract (copy_engine.py; `StreamCopier` is the CUDA one): the
thread blocks in `wait()`, which is therefore also `synchronize()`.
"""

from __future__ import annotations

import queue
import threading

import torch

from esper.tolaria.state.snapshot import SnapshotCopyError


class CopyJob:
    """One snapshot's deferred copies; `wait` returns once done or raises SnapshotCopyError."""

    def __init__(self, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        self._dst: list[torch.Tensor] | None = dst
        self._src: list[torch.Tensor] | None = src
        self.nbytes = sum(t.numel() * t.element_size() for t in dst)
        self._done = threading.Event()
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            if self._dst and self._src:
                with torch.no_grad():
                    torch._foreach_copy_(self._dst, self._src)
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits on the snapshot
            self._error = exc
        finally:
            self._dst = self._src = None  # drop the references: buffers can be recycled, live tensors freed
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def synchronize(self, timeout: float | None = None) -> None:
        self.wait(timeout)

    def wait(self, timeout: float | None = None) -> None:
        if not self._done.wait(timeout):
            raise SnapshotCopyError(f"the snapshot's background copy ({self.nbytes} bytes) did not finish "
                                    f"within {timeout} s")
        if self._error is not None:
            raise SnapshotCopyError(f"the snapshot's background copy failed: {type(self._error).__name__}: "
                                    f"{self._error}") from self._error


class BackgroundCopier:
    """A daemon thread running `CopyJob`s in submission order."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[CopyJob | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.jobs_total = 0
        self.bytes_total = 0

    def submit(self, dst: list[torch.Tensor], src: list[torch.Tensor], *, at_once: int = 0) -> CopyJob:
        """Queue the copies; the first `at_once` pairs are copied here, before this returns."""
        if at_once:
            with torch.no_grad():
                torch._foreach_copy_(dst[:at_once], src[:at_once])
        job = CopyJob(dst[at_once:], src[at_once:])
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="tolaria-snapshot-copier", daemon=True)
                self._thread.start()
        self.jobs_total += 1
        self.bytes_total += job.nbytes
        self._jobs.put(job)
        return job

    def close(self, timeout: float | None = None) -> None:
        """Finish queued jobs and stop the thread (a later submit starts a new one)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job.run()

