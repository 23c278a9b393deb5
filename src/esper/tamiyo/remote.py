"""Tamiyo over Oona: the client Tolaria calls (`RemoteTamiyo`) and the worker that answers
(`TamiyoWorker`, run by `tamiyo serve`).

Request: a BusEnvelope SYSTEM_STATE on the request stream (`oona.normal`) with attributes
`reply_to` (the client's reply stream), `correlation_id` (= packet.packet_id) and `event_id`.
Reply: a BusEnvelope ADAPTATION_COMMAND on `reply_to` with the same `correlation_id`; the command
inside is signed (LEYLINE.md, "Signed commands") and the client verifies it before returning it.
Each client reads its own reply stream from a cursor taken before it publishes, and ignores
replies whose correlation id is not the one it waits for (late answers to timed-out requests).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from esper.leyline import (
    BUS_MESSAGE_TYPE_ADAPTATION_COMMAND,
    BUS_MESSAGE_TYPE_SYSTEM_STATE,
    AdaptationCommand,
    LeylineDecodeError,
    SystemStatePacket,
    new_id,
    parse,
)
from esper.oona import (
    BusUnavailable,
    CommandRejected,
    CommandVerifier,
    Deduplicator,
    Delivery,
    RedisBus,
    load_secret,
    sign_command,
)
from esper.oona.streams import CORRELATION_ID, EVENT_ID, REPLY_TO, envelope_for

if TYPE_CHECKING:  # only the type: importing esper.contracts at runtime would pull torch into the worker
    from esper.contracts import TamiyoClient

log = logging.getLogger(__name__)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class RemoteTamiyo:
    """`TamiyoClient` that asks a `tamiyo serve` worker over Redis Streams.

    `evaluate_epoch` returns a verified command, or raises `TimeoutError` once `timeout_s` has
    passed without a matching reply, `CommandRejected` for a reply that fails verification, and
    `BusUnavailable` when Redis is down. Safe to call again while an abandoned call still waits:
    every call reads from its own cursor. `close()` deletes the reply stream this client created.
    """

    def __init__(self, bus: RedisBus, *, secret: bytes | None = None, request_stream: str = "oona.normal",
                 reply_stream: str | None = None, timeout_s: float = 2.0,
                 verifier: CommandVerifier | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"RemoteTamiyo timeout_s={timeout_s} must be > 0")
        self.bus = bus
        self.request_stream = bus.streams.resolve(request_stream)
        self._owns_reply_stream = reply_stream is None
        self.reply_stream = reply_stream or f"{bus.streams.normal}.reply.{new_id()[:16]}"
        self.timeout_s = timeout_s
        self._verifier = verifier or CommandVerifier(secret if secret is not None else load_secret())
        self._verify_lock = threading.Lock()
        self._cursor = bus.last_entry_id(self.reply_stream)
        self._cursor_lock = threading.Lock()

    def evaluate_epoch(self, packet: SystemStatePacket) -> AdaptationCommand:
        if not packet.packet_id:
            raise ValueError("SystemStatePacket.packet_id is empty: the reply is matched on it; "
                             "build packets with esper.leyline.system_state_packet")
        deadline = time.monotonic() + self.timeout_s
        with self._cursor_lock:
            cursor = self._cursor
        envelope = envelope_for(BUS_MESSAGE_TYPE_SYSTEM_STATE, packet,
                                **{REPLY_TO: self.reply_stream, CORRELATION_ID: packet.packet_id})
        self.bus.publish(self.request_stream, envelope)
        while (remaining_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            block_ms = max(1, min(remaining_ms, int(self.bus.read_timeout_s * 500)))
            deliveries, cursor = self.bus.read(self.reply_stream, cursor, count=16, block_ms=block_ms)
            self._advance(cursor)
            for delivery in deliveries:
                command = self._match(delivery, packet.packet_id)
                if command is not None:
                    return command
        raise TimeoutError(f"Tamiyo did not answer packet {packet.packet_id} on {self.reply_stream} within "
                           f"{self.timeout_s:g} s; is `tamiyo serve --oona {self.bus.url}` running?")

    def _advance(self, cursor: str) -> None:
        with self._cursor_lock:
            if _id_key(cursor) > _id_key(self._cursor):
                self._cursor = cursor

    def _match(self, delivery: Delivery, packet_id: str) -> AdaptationCommand | None:
        envelope = delivery.envelope
        if (envelope.message_type != BUS_MESSAGE_TYPE_ADAPTATION_COMMAND
                or envelope.attributes.get(CORRELATION_ID) != packet_id):
            return None
        try:
            command = parse(AdaptationCommand, envelope.payload)
        except LeylineDecodeError as exc:
            raise CommandRejected("malformed", f"reply to packet {packet_id}: {exc}") from exc
        with self._verify_lock:
            self._verifier.verify(command)
        return command

    def close(self) -> None:
        if self._owns_reply_stream:
            try:
                self.bus.delete_stream(self.reply_stream)
            except BusUnavailable as exc:  # the stream is left behind; nothing else depends on it
                log.warning("RemoteTamiyo: could not delete reply stream %s: %s", self.reply_stream, exc)


class TamiyoWorker:
    """Answers SYSTEM_STATE requests from a consumer group, one controller per training run.

    For each request: parse the packet, skip it if older than `max_request_age_s` (its caller has
    long given up), run the run's controller, sign the command, publish it to `reply_to`, ACK.
    A controller error leaves the entry un-ACKed: it is retried after `reclaim_idle_ms` and
    dead-lettered by the bus after `max_failures` failures. Entries that are not SYSTEM_STATE
    requests are ACKed and ignored (the request stream also carries other traffic). A request
    redelivered after it was answered (the worker died between reply and ACK) is ACKed, not
    answered twice.
    """

    def __init__(self, bus: RedisBus, controller_factory: Callable[[], TamiyoClient], *,
                 secret: bytes | None = None, group: str = "tamiyo", consumer: str | None = None,
                 request_stream: str = "oona.normal", block_ms: int = 500, max_request_age_s: float = 30.0,
                 reclaim_every_s: float = 5.0, max_runs: int = 64, clock: Callable[[], float] = time.time) -> None:
        self.bus = bus
        self.controller_factory = controller_factory
        self._secret = secret if secret is not None else load_secret()
        self.group = group
        self.consumer = consumer or f"tamiyo-{new_id()[:8]}"
        self.request_stream = bus.streams.resolve(request_stream)
        self.block_ms = block_ms
        self.max_request_age_s = max_request_age_s
        self.reclaim_every_s = reclaim_every_s
        self.max_runs = max_runs
        self._clock = clock
        self._controllers: OrderedDict[str, TamiyoClient] = OrderedDict()
        self._next_reclaim = 0.0
        self._answered_ids = Deduplicator(capacity=10_000)
        self.answered = 0
        self.skipped = 0
        self.failed = 0

    def run(self, stop: threading.Event | None = None, *, once: bool = False) -> int:
        """Serve until `stop` is set (or, with `once`, until one request is answered).
        Returns the number of requests answered. A Redis outage is logged and waited out."""
        stop = stop or threading.Event()
        self.bus.ensure_group(self.request_stream, self.group)
        while not stop.is_set():
            try:
                # With `once`, read one entry at a time: a read-but-unhandled entry would sit
                # pending until another worker reclaims it.
                batch = self._next_batch(1 if once else 8)
            except BusUnavailable as exc:
                log.warning("tamiyo serve: %s", exc)
                stop.wait(0.2)
                continue
            for delivery in batch:
                if self.handle(delivery) and once:
                    return self.answered
        return self.answered

    def _next_batch(self, count: int) -> list[Delivery]:
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + self.reclaim_every_s
            reclaimed = self.bus.reclaim(self.request_stream, self.group, self.consumer, count=count)
            if reclaimed:
                return reclaimed
        return self.bus.consume(self.request_stream, self.group, self.consumer, count=count, block_ms=self.block_ms)

    def handle(self, delivery: Delivery) -> bool:
        """Process one entry; True when a command was published in reply."""
        envelope = delivery.envelope
        reply_to = envelope.attributes.get(REPLY_TO, "")
        not_a_request = envelope.message_type != BUS_MESSAGE_TYPE_SYSTEM_STATE or not reply_to
        if not_a_request or delivery.event_id in self._answered_ids:
            self.bus.ack(delivery)
            return False
        try:
            packet = parse(SystemStatePacket, envelope.payload)
        except LeylineDecodeError as exc:
            self.bus.dead_letter(delivery, f"unparseable SystemStatePacket: {exc}")
            return False
        age = self._clock() - packet.timestamp_ns / 1e9
        if age > self.max_request_age_s:
            log.info("tamiyo serve: skipping packet %s, %.0f s old", packet.packet_id, age)
            self.skipped += 1
            self.bus.ack(delivery)
            return False
        command = self._evaluate(packet)
        if command is None:
            return False
        sign_command(command, self._secret)
        reply = envelope_for(BUS_MESSAGE_TYPE_ADAPTATION_COMMAND, command,
                             **{CORRELATION_ID: envelope.attributes.get(CORRELATION_ID, packet.packet_id),
                                "in_reply_to": envelope.attributes.get(EVENT_ID, "")})
        self.bus.publish(reply_to, reply)
        self._answered_ids.seen(delivery.event_id)
        self.bus.ack(delivery)
        self.answered += 1
        return True

    def _evaluate(self, packet: SystemStatePacket) -> AdaptationCommand | None:
        try:
            return self._controller(packet.training_run_id).evaluate_epoch(packet)
        except Exception:  # a controller bug must not kill the worker; the entry will be retried
            self.failed += 1
            log.exception("tamiyo serve: controller failed on packet %s", packet.packet_id)
            return None

    def _controller(self, run_id: str) -> TamiyoClient:
        # Controllers keep per-run history (plateaus, cooldowns): runs must not share one.
        controller = self._controllers.get(run_id)
        if controller is None:
            controller = self._controllers[run_id] = self.controller_factory()
            if len(self._controllers) > self.max_runs:
                self._controllers.popitem(last=False)
        self._controllers.move_to_end(run_id)
        return controller
