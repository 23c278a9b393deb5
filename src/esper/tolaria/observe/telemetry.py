"""Telemetry: Leyline `TelemetryPacket`s built on the training thread, published off it.

Normal packets enter a bounded queue drained by one background publisher thread, so a step
never waits on the bus. When the queue is full the lowest-priority packet goes first (the
oldest of that priority); every drop is counted by priority. Emergency-priority packets bypass
the queue and are published on the caller's thread to the emergency stream.

Every envelope carries the run's id (`attributes["run_id"]`, the id when the packet was
published), so viewers of a shared Redis can tell runs apart. A run's process publishes a
`run_started` event when `fit()` begins (epoch, step, epochs, and the checkpoint it resumed
from, if any) and a `run_ended` event when it leaves (status `finished`, `stopped` or `failed`,
with the reason). The end marker is sent after everything queued before it and on the caller's
thread, so it is the run's last packet even though the queue sends higher priorities first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from esper.contracts import BatchPublisher, OonaBus
from esper.leyline import (
    BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL,
    BUS_MESSAGE_TYPE_TELEMETRY,
    MESSAGE_PRIORITY_CRITICAL,
    MESSAGE_PRIORITY_HIGH,
    MESSAGE_PRIORITY_LOW,
    MESSAGE_PRIORITY_NORMAL,
    TELEMETRY_LEVEL_ERROR,
    TELEMETRY_LEVEL_INFO,
    BusEnvelope,
    EmergencySignal,
    MessagePriority,
    MetricPoint,
    TelemetryEvent,
    TelemetryPacket,
    new_id,
    now_timestamp,
)
from esper.tolaria.observe.runlog import EpochRecord
from esper.tolaria.state.position import TrainerState

log = logging.getLogger(__name__)

RUN_STARTED = "run_started"
RUN_ENDED = "run_ended"
RUN_ID = "run_id"  # the envelope attribute naming the run
TELEMETRY_STREAM = "oona.telemetry"
EMERGENCY_STREAM = "oona.emergency"
_PRIORITIES = (MESSAGE_PRIORITY_LOW, MESSAGE_PRIORITY_NORMAL, MESSAGE_PRIORITY_HIGH)
_BATCH = 64  # packets per pipelined round trip


class PriorityDropQueue:
    """Bounded queue with one deque per priority; when full, evicts the oldest lowest-priority item."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._queues: dict[int, deque[Any]] = {p: deque() for p in _PRIORITIES}
        self._size = 0
        self._taken = 0  # items a consumer took and has not reported `done` yet (being sent)
        self.dropped: dict[int, int] = {p: 0 for p in _PRIORITIES}
        self._cond = threading.Condition()

    def put(self, item: Any, priority: int) -> None:
        with self._cond:
            if self._size >= self.capacity and not self._evict_below_or_equal(priority):
                self.dropped[priority] += 1
                return
            self._queues[priority].append(item)
            self._size += 1
            self._cond.notify()

    def _evict_below_or_equal(self, priority: int) -> bool:
        for p in _PRIORITIES:
            if p > priority:
                return False
            if self._queues[p]:
                self._queues[p].popleft()
                self._size -= 1
                self.dropped[p] += 1
                return True
        return False

    def get(self, timeout: float) -> Any | None:
        """Highest priority first; None after `timeout` with nothing queued."""
        with self._cond:
            if not self._size and not self._cond.wait(timeout) or not self._size:
                return None
            for p in reversed(_PRIORITIES):
                if self._queues[p]:
                    self._size -= 1
                    self._taken += 1
                    return self._queues[p].popleft()
        return None

    def done(self, count: int) -> None:
        """The consumer finished with `count` items it took (sent, or failed and counted)."""
        with self._cond:
            self._taken -= count

    @property
    def drained(self) -> bool:
        """Nothing queued and nothing taken but unfinished: every item put has been handled."""
        return self._size == 0 and self._taken == 0

    def wake(self) -> None:
        """Wake a waiting `get` (used to stop the publisher without waiting for its timeout)."""
        with self._cond:
            self._cond.notify_all()

    def __len__(self) -> int:
        return self._size


class TelemetryCollector:
    """Builds telemetry packets and hands them to the bus without blocking the training thread."""

    def __init__(self, bus: OonaBus, *, queue_size: int = 10_000, source: str = "tolaria",
                 telemetry_stream: str = TELEMETRY_STREAM, emergency_stream: str = EMERGENCY_STREAM,
                 run_id: str = "") -> None:
        self.bus = bus  # its batching capability is checked once here (and when the bus is replaced)
        self.source = source
        self.run_id = run_id  # stamped on each envelope; a resume may adopt the saved id (see run_started)
        self.telemetry_stream = telemetry_stream
        self.emergency_stream = emergency_stream
        self.queue = PriorityDropQueue(queue_size)
        self.published = 0
        self.publish_failures = 0
        self.emergency_published = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="tolaria-telemetry", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- building packets
    def packet(
        self,
        metrics: Mapping[str, float] | None = None,
        events: list[TelemetryEvent] | None = None,
        *,
        level: int = TELEMETRY_LEVEL_INFO,
        attributes: Mapping[str, str] | None = None,
    ) -> TelemetryPacket:
        pkt = TelemetryPacket(packet_id=new_id(), source_subsystem=self.source, level=level)  # type: ignore[arg-type]
        pkt.timestamp.CopyFrom(now_timestamp())
        for name, value in (metrics or {}).items():
            point = MetricPoint(name=name, value=float(value), unit=_unit(name))
            if attributes:
                point.attributes.update(attributes)
            pkt.metrics.append(point)
        if events:
            pkt.events.extend(events)
        return pkt

    @staticmethod
    def event(description: str, level: int = TELEMETRY_LEVEL_INFO, **attributes: object) -> TelemetryEvent:
        evt = TelemetryEvent(event_id=new_id(), description=description, level=level)  # type: ignore[arg-type]
        evt.attributes.update({k: str(v) for k, v in attributes.items()})
        return evt

    # ---------------------------------------------------------------- publishing
    def publish(self, packet: TelemetryPacket, priority: int = MESSAGE_PRIORITY_NORMAL) -> None:
        """Queue a packet; never blocks. CRITICAL priority bypasses the queue."""
        if priority == MESSAGE_PRIORITY_CRITICAL:
            self._send(self.emergency_stream, BUS_MESSAGE_TYPE_TELEMETRY, packet.SerializeToString(),
                       priority, packet.packet_id)
            return
        self.queue.put((packet, priority, self.run_id), priority)  # the id now: the publisher sends later

    def publish_step(self, step: int, loss: float, grad_norm: float) -> None:
        """One LOW-priority packet of a step's loss and gradient norm (every telemetry.step_interval steps)."""
        self.publish(self.packet({"tolaria.step.loss": loss, "tolaria.step.grad_norm": grad_norm},
                                 attributes={"step": str(step)}), MESSAGE_PRIORITY_LOW)

    def publish_epoch(self, record: EpochRecord) -> None:
        """One NORMAL-priority packet of the epoch's figures."""
        metrics: dict[str, float] = {
            "tolaria.epoch.duration_ms": record.epoch_seconds * 1e3, "tolaria.boundary.latency_ms": record.boundary_ms,
            "tolaria.train.loss": record.train_loss, "tolaria.val.loss": record.val_loss,
            "tolaria.val.accuracy": record.val_accuracy, "tolaria.model.params": float(record.param_count),
            "tolaria.train.flops": record.flops,
            **{f"tolaria.val.{k}": v for k, v in record.val_metrics.items()}}
        metrics.update({f"tolaria.lr_controller.lr.{k}": v for k, v in record.lr.items()})
        self.publish(self.packet(metrics, attributes={"epoch": str(record.epoch)}), MESSAGE_PRIORITY_NORMAL)

    def run_started(self, run_id: str, at: TrainerState, epochs: int, resumed_from: str = "") -> None:
        """The run-start marker at position `at`; from here on envelopes carry `run_id` (a resume adopts
        the saved id)."""
        self.run_id = run_id
        self.emit_event(RUN_STARTED, TELEMETRY_LEVEL_INFO, MESSAGE_PRIORITY_NORMAL, run_id=run_id, epoch=at.epoch,
                        step=at.global_step, epochs=epochs, resumed_from=resumed_from)

    def run_ended(self, status: str, at: TrainerState, *, reason: str | None = "") -> None:
        """The run-end marker at position `at`: `status` is finished, stopped or failed; `reason` says why
        it stopped. Sent once the queue has drained (see the module docstring)."""
        level = TELEMETRY_LEVEL_ERROR if status == "failed" else TELEMETRY_LEVEL_INFO
        packet = self.packet(events=[self.event(RUN_ENDED, level, run_id=self.run_id, status=status,
                                                epoch=at.epoch, step=at.global_step, reason=reason or "")], level=level)
        self.flush()
        self._send(self.telemetry_stream, BUS_MESSAGE_TYPE_TELEMETRY, packet.SerializeToString(),
                   MESSAGE_PRIORITY_HIGH, packet.packet_id)

    def emit_event(self, description: str, level: int = TELEMETRY_LEVEL_INFO,
                   priority: int = MESSAGE_PRIORITY_NORMAL, **attributes: object) -> None:
        self.publish(self.packet(events=[self.event(description, level, **attributes)], level=level), priority)

    def publish_emergency(self, signal: EmergencySignal) -> None:
        """Emergency signals go straight to the emergency stream on the caller's thread."""
        if self._send(self.emergency_stream, BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL, signal.SerializeToString(),
                      MESSAGE_PRIORITY_CRITICAL, new_id()):
            self.emergency_published += 1

    def _envelope(self, message_type: int, payload: bytes, priority: int, event_id: str,
                  run_id: str | None = None) -> BusEnvelope:
        envelope = BusEnvelope(message_type=message_type, payload=payload)  # type: ignore[arg-type]
        envelope.attributes.update({"event_id": event_id, "priority": MessagePriority.Name(priority),  # type: ignore[arg-type]
                                    "source_subsystem": self.source})
        run = self.run_id if run_id is None else run_id
        if run:
            envelope.attributes[RUN_ID] = run
        return envelope

    @property
    def bus(self) -> OonaBus:
        return self._bus

    @bus.setter
    def bus(self, bus: OonaBus) -> None:
        self._bus, self._batches = bus, isinstance(bus, BatchPublisher)

    def _send(self, stream: str, message_type: int, payload: bytes, priority: int, event_id: str) -> bool:
        return self._send_batch(stream, [self._envelope(message_type, payload, priority, event_id)])

    def _send_batch(self, stream: str, envelopes: list[BusEnvelope]) -> bool:
        """One round trip for the batch where the bus can pipeline (Redis), else one publish each."""
        bus = self.bus
        try:
            if self._batches and len(envelopes) > 1:
                bus.publish_many(stream, envelopes)  # type: ignore[attr-defined]
            else:
                for envelope in envelopes:
                    self.bus.publish(stream, envelope)
        except (OSError, ConnectionError, TimeoutError, RuntimeError) as exc:
            # A dead bus must not stop training: count it, keep the last error for the summary.
            self.publish_failures += len(envelopes)
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        self.published += len(envelopes)
        return True

    def _drain(self) -> None:
        while not self._stop.is_set() or len(self.queue):
            # A long wait: an idle publisher must not wake up and steal a core from torch's threads.
            item = self.queue.get(timeout=1.0)
            if item is None:
                continue
            batch = [item]
            while len(batch) < _BATCH and (more := self.queue.get(timeout=0.0)) is not None:
                batch.append(more)  # whatever else is already queued goes in the same round trip
            try:
                envelopes = [self._envelope(BUS_MESSAGE_TYPE_TELEMETRY, packet.SerializeToString(), priority,
                                            packet.packet_id, run_id) for packet, priority, run_id in batch]
                sent = self._send_batch(self.telemetry_stream, envelopes)
            finally:
                self.queue.done(len(batch))
            if not sent:
                # Bus down: back off briefly so a dead Redis does not spin this thread.
                time.sleep(0.05)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued packet was handed to the bus (or counted as failed), the batch in
        flight included; False if that took longer than `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self.queue.drained and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.queue.drained

    def close(self, timeout_s: float = 5.0) -> None:
        self.flush(timeout_s)
        self._stop.set()
        self.queue.wake()
        self._thread.join(timeout_s)

    def summary(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "dropped": sum(self.queue.dropped.values()) + self.publish_failures,
            "dropped_by_priority": {MessagePriority.Name(p).removeprefix("MESSAGE_PRIORITY_"): n  # type: ignore[arg-type]
                                    for p, n in self.queue.dropped.items()},
            "publish_failures": self.publish_failures,
            "emergency_published": self.emergency_published,
            "queued": len(self.queue),
            "last_error": self.last_error,
        }


def _unit(name: str) -> str:
    for suffix, unit in (("_ms", "ms"), ("_s", "s"), ("_bytes", "bytes"), ("_total", "count"), ("accuracy", "ratio")):
        if name.endswith(suffix):
            return unit
    return ""

