"""The Tamiyo handshake: one packet out, one verified command back, under a hard deadline.

A Tamiyo call runs on a long-lived worker thread. The caller waits on that call's own result
slot with a timeout and returns at the deadline whatever the worker does; a worker stuck in a
hung call is abandoned (never joined) and a fresh worker takes the next call. Too many abandoned
workers *still running* and calls are refused outright, so a controller that hangs every epoch
cannot leak threads without bound; an abandoned worker whose call returns late counts itself back
and exits, so slow answers never add up to a permanent refusal.

A caller may pass a deadline shorter than the handshake's own (conservative mode's shorter
leash). A call that misses only that shorter deadline is a fallback of kind "late": the no-op is
used this epoch, but it is not a controller failure (`HandshakeOutcome.is_failure`), because the
controller may still meet its contract. Otherwise a controller that answers within the normal
deadline could never close its breaker, and conservative mode could never be left.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from esper.contracts import TamiyoClient
from esper.leyline import (
    COMMAND_SEED,
    SEED_OP_GERMINATE,
    AdaptationCommand,
    LeylineError,
    SystemStatePacket,
    noop_command,
    validate_command,
)
from esper.oona.errors import CommandRejected


class HandshakeError(Exception):
    """A Tamiyo call failed; `kind` is one of timeout, late, error, invalid, expired, refused, rejected."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Call:
    __slots__ = ("fn", "arg", "done", "result", "error", "abandoned")

    def __init__(self, fn: Callable[[Any], Any], arg: Any) -> None:
        self.fn, self.arg = fn, arg
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False


class DeadlineCaller:
    """Runs calls on a reusable worker thread and returns at the deadline.

    `abandoned` counts workers left inside a call that are still running; a worker whose call
    returns after its caller gave up takes itself off the count and exits."""

    def __init__(self, *, max_abandoned: int = 4, name: str = "tamiyo-call") -> None:
        self._name = name
        self._max_abandoned = max_abandoned
        self.abandoned = 0
        self.returned_late = 0  # abandoned calls that did return, later
        self._lock = threading.Lock()  # a call's done/abandoned verdict and the counts
        self._inbox: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._start_worker()

    def _start_worker(self) -> None:
        self._inbox = queue.SimpleQueue()
        threading.Thread(target=self._work, args=(self._inbox,), name=self._name, daemon=True).start()

    def _work(self, inbox: queue.SimpleQueue[_Call | None]) -> None:
        while (call := inbox.get()) is not None:
            try:
                call.result = call.fn(call.arg)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who decides
                call.error = exc
            with self._lock:
                call.done.set()
                if call.abandoned:  # nobody waits on this inbox any more: count back and leave
                    self.abandoned -= 1
                    self.returned_late += 1
                    return

    def call(self, fn: Callable[[Any], Any], arg: Any, timeout_s: float) -> Any:
        with self._lock:
            hung = self.abandoned
        if hung >= self._max_abandoned:
            raise HandshakeError("refused", f"{hung} calls are still hung; refusing new calls")
        call = _Call(fn, arg)
        self._inbox.put(call)
        if not call.done.wait(timeout_s) and self._abandon(call):
            # The worker is stuck inside fn: leave it behind and give the next call a fresh one.
            self._start_worker()
            raise HandshakeError("timeout", f"no answer within {timeout_s * 1000:.0f} ms")
        if call.error is not None:
            raise HandshakeError("error", f"{type(call.error).__name__}: {call.error}") from call.error
        return call.result

    def _abandon(self, call: _Call) -> bool:
        """Give up on `call` unless it finished just now (then its answer is used)."""
        with self._lock:
            if call.done.is_set():
                return False
            call.abandoned = True
            self.abandoned += 1
            return True

    def close(self) -> None:
        self._inbox.put(None)


@dataclass(frozen=True)
class HandshakeOutcome:
    command: AdaptationCommand
    fallback: bool
    failure_kind: str = ""
    failure: str = ""
    latency_ms: float = 0.0

    @property
    def is_failure(self) -> bool:
        """Whether the controller failed its contract (charged to its breaker): every fallback but
        "late", a call that missed only a caller's shorter deadline."""
        return self.fallback and self.failure_kind != "late"


class TamiyoHandshake:
    """Calls Tamiyo with a deadline, verifies the answer, and falls back to a recorded no-op."""

    def __init__(
        self,
        tamiyo: TamiyoClient,
        *,
        timeout_s: float,
        command_max_age_s: float = 60.0,
        max_abandoned: int = 4,
        verifier: Callable[[AdaptationCommand], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tamiyo = tamiyo
        self.timeout_s = timeout_s
        self.command_max_age_s = command_max_age_s
        self.verifier = verifier
        self._clock = clock
        self._caller = DeadlineCaller(max_abandoned=max_abandoned)

    def exchange(self, packet: SystemStatePacket, *, timeout_s: float | None = None) -> HandshakeOutcome:
        """One call under `timeout_s` (default: the handshake's own deadline). A shorter `timeout_s`
        that expires gives a "late" fallback, not a failure (module docstring)."""
        start = time.perf_counter()
        deadline = timeout_s or self.timeout_s
        try:
            answer = self._caller.call(self.tamiyo.evaluate_epoch, packet, deadline)
            command = self.verify(answer)
        except HandshakeError as exc:
            # A remote client that verified the reply itself raises a rejection with a reason code.
            kind = "rejected" if isinstance(exc.__cause__, CommandRejected) else exc.kind
            message = str(exc)
            if kind == "timeout" and deadline < self.timeout_s:
                kind = "late"
                message += f" (the shortened deadline; the controller's own is {self.timeout_s * 1000:.0f} ms)"
            return self._fallback(kind, message, start)
        return HandshakeOutcome(command=command, fallback=False, latency_ms=(time.perf_counter() - start) * 1e3)

    def verify(self, answer: object) -> AdaptationCommand:
        """Structure, freshness and (where configured) signature; raises HandshakeError."""
        if not isinstance(answer, AdaptationCommand):
            raise HandshakeError("invalid", f"Tamiyo returned {type(answer).__name__}, not an AdaptationCommand")
        try:
            validate_command(answer)
        except LeylineError as exc:
            raise HandshakeError("invalid", str(exc)) from exc
        if not answer.HasField("issued_at"):
            raise HandshakeError("invalid", "command has no issued_at")
        age = self._clock() - answer.issued_at.ToNanoseconds() / 1e9
        if age > self.command_max_age_s:
            raise HandshakeError("expired", f"command {answer.command_id} issued {age:.1f} s ago "
                                 f"(limit {self.command_max_age_s:.0f} s)")
        if self.verifier is not None:
            try:
                self.verifier(answer)
            except (ValueError, LookupError) as exc:
                raise HandshakeError("rejected", f"{type(exc).__name__}: {exc}") from exc
        return answer

    def _fallback(self, kind: str, message: str, start: float) -> HandshakeOutcome:
        command = noop_command(issued_by="tolaria", reason=f"fallback: tamiyo {kind}: {message}")
        command.annotations["fallback"] = kind
        return HandshakeOutcome(command=command, fallback=True, failure_kind=kind, failure=message,
                                latency_ms=(time.perf_counter() - start) * 1e3)

    def close(self) -> None:
        self._caller.close()


def is_germination(command: AdaptationCommand) -> bool:
    return command.command_type == COMMAND_SEED and command.seed_operation.operation == SEED_OP_GERMINATE
