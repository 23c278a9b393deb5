"""RemoteTamiyo and TamiyoWorker over a real redis-server: answers, deadlines, verification."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from oona_support import SECRET, unique_streams

from esper.leyline import (
    BUS_MESSAGE_TYPE_ADAPTATION_COMMAND,
    SEED_OP_GERMINATE,
    AdaptationCommand,
    SystemStatePacket,
    seed_command,
    system_state_packet,
)
from esper.oona import CommandRejected, RedisBus, StreamNames, sign_command
from esper.oona.streams import envelope_for
from esper.tamiyo.remote import RemoteTamiyo, TamiyoWorker

pytestmark = pytest.mark.redis


class EchoController:
    """Germinates a blueprint named after the packet's epoch; counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def evaluate_epoch(self, packet: SystemStatePacket) -> AdaptationCommand:
        self.calls += 1
        return seed_command(SEED_OP_GERMINATE, issued_by="tamiyo", blueprint_id=f"epoch{packet.current_epoch}")


def _packet(epoch: int = 1, run_id: str = "run") -> SystemStatePacket:
    return system_state_packet(epoch=epoch, global_step=10 * epoch, training_loss=1.0, validation_loss=1.0,
                               validation_accuracy=0.5, run_id=run_id)


class WorkerThread:
    def __init__(self, bus: RedisBus, worker: TamiyoWorker) -> None:
        self.worker = worker
        self.stop = threading.Event()
        bus.ensure_group(worker.request_stream, worker.group)
        self.thread = threading.Thread(target=worker.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.fixture()
def served(bus: RedisBus) -> Iterator[tuple[RedisBus, WorkerThread, list[EchoController]]]:
    made: list[EchoController] = []

    def factory() -> EchoController:
        made.append(EchoController())
        return made[-1]

    worker = WorkerThread(bus, TamiyoWorker(bus, factory, secret=SECRET, block_ms=50))
    yield bus, worker, made
    worker.close()


def test_remote_tamiyo_returns_the_workers_verified_command(served) -> None:
    bus, _, made = served
    client = RemoteTamiyo(bus, secret=SECRET, timeout_s=5)
    for epoch in (1, 2, 3):
        command = client.evaluate_epoch(_packet(epoch))
        assert command.seed_operation.blueprint_id == f"epoch{epoch}" and command.annotations["signature"]
    assert len(made) == 1 and made[0].calls == 3
    client.close()
    assert bus.length(client.reply_stream) == 0


def test_each_training_run_gets_its_own_controller(served) -> None:
    bus, _, made = served
    client = RemoteTamiyo(bus, secret=SECRET, timeout_s=5)
    client.evaluate_epoch(_packet(1, run_id="a"))
    client.evaluate_epoch(_packet(1, run_id="b"))
    client.evaluate_epoch(_packet(2, run_id="a"))
    assert [c.calls for c in made] == [2, 1]


def test_two_clients_never_receive_each_others_replies(served) -> None:
    bus, _, _ = served
    first, second = RemoteTamiyo(bus, secret=SECRET, timeout_s=5), RemoteTamiyo(bus, secret=SECRET, timeout_s=5)
    results: dict[str, str] = {}

    def ask(name: str, client: RemoteTamiyo, epoch: int) -> None:
        results[name] = client.evaluate_epoch(_packet(epoch)).seed_operation.blueprint_id

    threads = [threading.Thread(target=ask, args=("a", first, 7)), threading.Thread(target=ask, args=("b", second, 8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"a": "epoch7", "b": "epoch8"}


def test_without_a_worker_evaluate_epoch_times_out_at_its_deadline(bus: RedisBus) -> None:
    client = RemoteTamiyo(bus, secret=SECRET, timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="tamiyo serve"):
        client.evaluate_epoch(_packet())
    assert 0.3 <= time.monotonic() - start < 1.3  # deadline + slack for a busy machine


def _later(fn: Callable[..., object], *args: object) -> threading.Timer:
    """Run `fn(*args)` on another thread in 50 ms, while the test waits in evaluate_epoch."""
    timer = threading.Timer(0.05, fn, args=args)
    timer.start()
    return timer


def _answer_with(bus: RedisBus, reply: AdaptationCommand, correlation_id: str, reply_stream: str) -> None:
    bus.publish(reply_stream, envelope_for(BUS_MESSAGE_TYPE_ADAPTATION_COMMAND, reply, correlation_id=correlation_id))


def test_a_forged_reply_is_rejected(bus: RedisBus) -> None:
    client = RemoteTamiyo(bus, secret=SECRET, timeout_s=3)
    packet = _packet()
    forged = sign_command(seed_command(SEED_OP_GERMINATE, issued_by="mallory", blueprint_id="x"), b"wrong")
    timer = _later(_answer_with, bus, forged, packet.packet_id, client.reply_stream)
    with pytest.raises(CommandRejected) as info:
        client.evaluate_epoch(packet)
    timer.join()
    assert info.value.reason_code == "forged"


def test_replies_to_other_packets_are_ignored_and_a_replayed_reply_is_rejected(bus: RedisBus) -> None:
    client = RemoteTamiyo(bus, secret=SECRET, timeout_s=3)
    packet = _packet()
    good = sign_command(seed_command(SEED_OP_GERMINATE, issued_by="tamiyo", blueprint_id="good"), SECRET)

    def answer() -> None:
        late = sign_command(seed_command(SEED_OP_GERMINATE, issued_by="tamiyo", blueprint_id="late"), SECRET)
        _answer_with(bus, late, "some-earlier-packet", client.reply_stream)
        _answer_with(bus, good, packet.packet_id, client.reply_stream)

    first = _later(answer)
    assert client.evaluate_epoch(packet).seed_operation.blueprint_id == "good"
    replay_target = _packet()
    second = _later(_answer_with, bus, good, replay_target.packet_id, client.reply_stream)
    with pytest.raises(CommandRejected) as info:
        client.evaluate_epoch(replay_target)
    first.join()
    second.join()  # the publisher may still be reading its XADD reply; the bus closes after the test
    assert info.value.reason_code == "replayed"


def test_worker_skips_stale_requests_and_ignores_other_traffic(bus: RedisBus) -> None:
    controller = EchoController()
    worker = TamiyoWorker(bus, lambda: controller, secret=SECRET, block_ms=10)
    bus.ensure_group(worker.request_stream, worker.group)
    old = _packet()
    old.timestamp_ns -= 120 * 10**9
    bus.publish("normal", envelope_for(1, old, reply_to="r", correlation_id=old.packet_id))
    bus.publish("normal", envelope_for(BUS_MESSAGE_TYPE_ADAPTATION_COMMAND, AdaptationCommand()))
    for delivery in bus.consume("normal", worker.group, "w", count=10):
        assert worker.handle(delivery) is False
    assert controller.calls == 0 and worker.skipped == 1
    assert bus._fast.xpending(bus.streams.normal, worker.group)["pending"] == 0


def test_a_failing_controller_leaves_the_request_for_retry(bus: RedisBus) -> None:
    class Broken:
        def evaluate_epoch(self, packet: SystemStatePacket) -> AdaptationCommand:
            raise RuntimeError("policy bug")

    worker = TamiyoWorker(bus, Broken, secret=SECRET)
    bus.ensure_group(worker.request_stream, worker.group)
    packet = _packet()
    bus.publish("normal", envelope_for(1, packet, reply_to="r", correlation_id=packet.packet_id))
    (delivery,) = bus.consume("normal", worker.group, "w")
    assert worker.handle(delivery) is False and worker.failed == 1
    assert bus._fast.xpending(bus.streams.normal, worker.group)["pending"] == 1


def test_tamiyo_serve_subprocess_answers_then_its_death_means_timeouts(private_redis) -> None:
    env = {**os.environ, "ESPER_LEYLINE_SECRET": SECRET.decode()}
    proc = subprocess.Popen([sys.executable, "-m", "esper.tamiyo.cli", "serve", "--oona", private_redis.url,
                             "--log-level", "WARNING"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    bus = RedisBus(private_redis.url, secret=SECRET)
    try:
        assert proc.stdout is not None and "ready" in proc.stdout.readline()
        client = RemoteTamiyo(bus, secret=SECRET, timeout_s=10)
        command = client.evaluate_epoch(_packet())
        assert command.command_id and command.annotations["signature"]
        proc.terminate()  # SIGTERM: a clean stop
        assert proc.wait(timeout=10) == 0
        client.timeout_s = 0.5
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            client.evaluate_epoch(_packet(2))
        assert time.monotonic() - start < 1.5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        bus.close()


def test_tamiyo_serve_without_secret_exits_with_a_clear_message(private_redis) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ESPER_LEYLINE_SECRET"}
    done = subprocess.run([sys.executable, "-m", "esper.tamiyo.cli", "serve", "--oona", private_redis.url],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "ESPER_LEYLINE_SECRET is not set" in done.stderr


def test_streams_are_configurable_for_worker_and_client(redis_url: str) -> None:
    streams: StreamNames = unique_streams()
    bus = RedisBus(redis_url, streams=streams, secret=SECRET)
    worker = WorkerThread(bus, TamiyoWorker(bus, EchoController, secret=SECRET, block_ms=50))
    try:
        client = RemoteTamiyo(bus, secret=SECRET, timeout_s=5)
        assert client.request_stream == streams.normal and client.reply_stream.startswith(streams.normal)
        assert client.evaluate_epoch(_packet(4)).seed_operation.blueprint_id == "epoch4"
    finally:
        worker.close()
        bus.close()


def test_a_request_redelivered_after_its_answer_is_not_answered_twice(bus: RedisBus) -> None:
    controller = EchoController()
    worker = TamiyoWorker(bus, lambda: controller, secret=SECRET)
    bus.ensure_group(worker.request_stream, worker.group)
    packet = _packet()
    bus.publish("normal", envelope_for(1, packet, reply_to="replies", correlation_id=packet.packet_id))
    (delivery,) = bus.consume("normal", worker.group, "w")
    assert worker.handle(delivery) is True
    assert worker.handle(delivery) is False  # the same entry again, as a reclaim would hand it over
    assert controller.calls == 1 and bus.length("replies") == 1
    bus.delete_stream("replies")
