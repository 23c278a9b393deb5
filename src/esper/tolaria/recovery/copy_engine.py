"""The copy engine: moving snapshot tensors between the model's device and host memory off the
training thread's critical path.

Snapshots live in host memory whatever device trains (nothing of the RAM cache occupies GPU
memory). One contract, two implementations:

- `BackgroundCopier` (snapshot_copier.py), for a model on the CPU: a worker thread.
- `StreamCopier` (here), for a model on CUDA: device-to-host copies into pinned host buffers on
  a dedicated side stream, which first waits for the work already queued on the current stream
  (so it copies the values the step left), then records an event.

A job (`CopyJob`) promises:

- `wait()`: everything the training thread does next is ordered after the copy, so a write to
  the source after `wait()` never reaches the copy. The thread blocks until the copy is done;
  on CUDA the current stream waits on the job's event instead, and the host does not block.
- `synchronize()`: the destination buffers hold their values, readable from the host (the
  checkpoint writer, a rollback's restore). On the thread this is `wait()`.
- `done()`: without blocking, whether the copy has finished.
- A failure is raised (as `SnapshotCopyError`) by `wait()` and `synchronize()`; jobs run in
  submission order; a job keeps its source and destination tensors alive until it is done, so a
  freed source's memory is never reused under the copy, and a destination buffer is given to a
  new job only once its last job is done (the cache synchronizes a spare before recycling it).

The restore direction (`upload_`) copies host to device on the same side stream, non_blocking
from pinned memory, and makes the current stream wait on it: sharing one stream per device orders
a rollback's reads of a host buffer before any later snapshot's writes into it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import torch

from esper.tolaria.state.snapshot import SnapshotCopyError

_POLL_S = 0.0005  # how often `synchronize(timeout)` looks at the events


class CopyJob(Protocol):
    nbytes: int

    def wait(self, timeout: float | None = None) -> None: ...

    def synchronize(self, timeout: float | None = None) -> None: ...

    def done(self) -> bool: ...


class CopyEngine(Protocol):
    jobs_total: int
    bytes_total: int

    def submit(self, dst: list[torch.Tensor], src: list[torch.Tensor], *, at_once: int = 0) -> CopyJob:
        """Copy `src[i]` into `dst[i]`; the first `at_once` pairs are ordered before whatever the
        training thread does next (state the next forward pass changes, such as BatchNorm's)."""
        ...

    def close(self) -> None: ...


def host_buffer_like(t: torch.Tensor) -> torch.Tensor:
    """A host tensor to receive a copy of device tensor `t`: pinned when `t` is on CUDA, so the copy
    can run asynchronously on a stream."""
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)


def fits_host_buffer(old: object, t: torch.Tensor) -> bool:
    """`old` can receive a copy of device tensor `t` as it is (a recycled host buffer)."""
    return (isinstance(old, torch.Tensor) and old.is_cpu and old.dtype == t.dtype and old.shape == t.shape
            and (not t.is_cuda or old.is_pinned()))


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The process's one copy stream for `device`, shared by snapshots and restores."""
    stream = _STREAMS.get(device)
    if stream is None:
        stream = _STREAMS[device] = torch.cuda.Stream(device=device)
    return stream


def _by_device(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], device_of: Sequence[torch.Tensor],
               ) -> dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    groups: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for d, s, on in zip(dst, src, device_of, strict=True):
        pair = groups.setdefault(on.device, ([], []))
        pair[0].append(d)
        pair[1].append(s)
    return groups


class StreamCopyJob:
    """Device-to-host copies queued on each source device's side stream, one event per device."""

    def __init__(self, dst: list[torch.Tensor], src: list[torch.Tensor], at_once: int) -> None:
        self.nbytes = sum(t.numel() * t.element_size() for t in dst)
        self._dst: list[torch.Tensor] | None = dst
        self._src: list[torch.Tensor] | None = src
        self._events: list[tuple[torch.device, torch.cuda.Event]] = []
        self._error: BaseException | None = None
        try:
            self._enqueue(dst, src, at_once)
        except Exception as exc:  # noqa: BLE001 - raised at wait(), as the contract says
            self._error = exc
            self._release()

    def _enqueue(self, dst: list[torch.Tensor], src: list[torch.Tensor], at_once: int) -> None:
        first = _by_device(dst[:at_once], src[:at_once], src[:at_once])
        rest = _by_device(dst[at_once:], src[at_once:], src[at_once:])
        for device in dict.fromkeys([*first, *rest]):
            stream, current = side_stream(device), torch.cuda.current_stream(device)
            stream.wait_stream(current)  # copy what the queued work leaves, not what it finds now
            with torch.cuda.stream(stream), torch.no_grad():
                if device in first:
                    torch._foreach_copy_(*first[device], non_blocking=True)
                    current.wait_event(_recorded(stream))  # the next forward waits for these only
                if device in rest:
                    torch._foreach_copy_(*rest[device], non_blocking=True)
                self._events.append((device, _recorded(stream)))

    def wait(self, timeout: float | None = None) -> None:
        self._raise_if_failed()
        for device, event in self._events:
            torch.cuda.current_stream(device).wait_event(event)

    def synchronize(self, timeout: float | None = None) -> None:
        self._raise_if_failed()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for _, event in self._events:
                if deadline is None:
                    event.synchronize()
                    continue
                while not event.query():
                    if time.monotonic() > deadline:
                        raise SnapshotCopyError(f"the snapshot's copy to host memory ({self.nbytes} bytes) did "
                                                f"not finish within {timeout} s")
                    time.sleep(_POLL_S)
        except RuntimeError as exc:  # an asynchronous CUDA error shows up at the synchronization
            if isinstance(exc, SnapshotCopyError):
                raise
            self._error = exc
            self._raise_if_failed()
        self._release()

    def done(self) -> bool:
        finished = self._error is not None or all(event.query() for _, event in self._events)
        if finished:
            self._release()
        return finished

    def _release(self) -> None:
        self._dst = self._src = None

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise SnapshotCopyError(f"the snapshot's copy to host memory failed: {type(self._error).__name__}: "
                                    f"{self._error}") from self._error


def _recorded(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record(stream)
    return event


class StreamCopier:
    """The CUDA copy engine: `StreamCopyJob`s on the side streams (see the module docstring)."""

    def __init__(self) -> None:
        self.jobs_total = 0
        self.bytes_total = 0

    def submit(self, dst: list[torch.Tensor], src: list[torch.Tensor], *, at_once: int = 0) -> StreamCopyJob:
        job = StreamCopyJob(dst, src, at_once)
        self.jobs_total += 1
        self.bytes_total += job.nbytes
        return job

    def close(self) -> None:
        """Nothing to stop: the streams belong to the process."""


def upload_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Copy host tensors `src` into CUDA tensors `dst` on the side stream (non_blocking: truly
    asynchronous from pinned memory); the current stream waits on it, so the next kernel sees the
    restored values and the host does not block. Grad must be off (`dst` may be leaf parameters)."""
    for device, (d, s) in _by_device(dst, src, dst).items():
        stream, current = side_stream(device), torch.cuda.current_stream(device)
        stream.wait_stream(current)  # queued kernels that read the old values run first
        with torch.cuda.stream(stream):
            torch._foreach_copy_(d, s, non_blocking=True)
        for t in d:
            t.record_stream(stream)  # a tensor freed meanwhile keeps its memory until the copy is done
        current.wait_event(_recorded(stream))
