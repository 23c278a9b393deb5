"""The `tamiyo` command. `tamiyo serve --oona redis://HOST:PORT/DB` answers Tolaria's
SystemStatePackets with signed AdaptationCommands from the heuristic controller.

Exit codes: 0 after a clean stop (SIGTERM, SIGINT, or `--once` answered), 2 for a
configuration error (no secret, bad arguments), 3 when Redis cannot be reached at start.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from esper.oona import BusUnavailable, RedisBus, SecretMissing, StreamNames, load_secret
from esper.tamiyo.remote import TamiyoWorker

if TYPE_CHECKING:  # the worker must not pull torch in through esper.contracts
    from esper.contracts import TamiyoClient


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tamiyo", description="Esper's strategic controller.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="answer SystemStatePackets arriving over Oona (Redis Streams)")
    serve.add_argument("--oona", required=True, metavar="redis://HOST:PORT/DB", help="Redis Streams URL")
    serve.add_argument("--group", default="tamiyo", help="consumer group (one per service; default tamiyo)")
    serve.add_argument("--consumer", default=None, help="consumer name within the group (default: random)")
    serve.add_argument("--request-stream", default="oona.normal", help="stream carrying requests")
    serve.add_argument("--deadletter-stream", default="oona.deadletter", help="stream for dead letters")
    serve.add_argument("--key-file", type=Path, default=None,
                       help="file holding the shared secret (default: env ESPER_LEYLINE_SECRET)")
    serve.add_argument("--config", type=Path, default=None, metavar="TOML",
                       help="read the heuristic's thresholds from this file's [tamiyo] section (e.g. the run's config)")
    serve.add_argument("--once", action="store_true", help="exit after answering one request")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _heuristic_factory(config_path: Path | None) -> Callable[[], TamiyoClient]:
    """One HeuristicTamiyo per run, configured from a TOML file's [tamiyo] section if given."""
    # Imported here so the worker module loads (and is testable) without the heuristic policy.
    from esper.tamiyo.heuristic import HeuristicTamiyo, TamiyoConfig

    settings: dict[str, object] = {}
    if config_path is not None:
        settings = tomllib.loads(config_path.read_text(encoding="utf-8")).get("tamiyo", {})
    config = TamiyoConfig.model_validate(settings)  # unknown keys are errors that name the key
    return lambda: HeuristicTamiyo(config)


def _install_stop_handlers(stop: threading.Event) -> None:
    def handle(signum: int, frame: FrameType | None) -> None:
        logging.getLogger("tamiyo").info("tamiyo serve: %s received, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        secret = load_secret(key_file=args.key_file)
    except SecretMissing as exc:
        print(f"tamiyo serve: {exc}", file=sys.stderr)
        return 2
    try:
        factory = _heuristic_factory(args.config)
    except (OSError, ValueError) as exc:
        print(f"tamiyo serve: bad --config {args.config}: {exc}", file=sys.stderr)
        return 2
    bus = RedisBus(args.oona, secret=secret, streams=StreamNames(deadletter=args.deadletter_stream))
    worker = TamiyoWorker(bus, factory, secret=secret, group=args.group, consumer=args.consumer,
                          request_stream=args.request_stream)
    stop = threading.Event()
    _install_stop_handlers(stop)
    try:
        bus.ensure_group(worker.request_stream, worker.group)
    except BusUnavailable as exc:
        print(f"tamiyo serve: {exc}", file=sys.stderr)
        return 3
    print(f"tamiyo serve: ready on {args.oona} stream={worker.request_stream} group={worker.group} "
          f"consumer={worker.consumer}", flush=True)
    try:
        answered = worker.run(stop, once=args.once)
    finally:
        bus.close()
    print(f"tamiyo serve: stopped after answering {answered} request(s)", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
