"""The ``loom`` command: developer tools around flows."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from loom.devtools.broker import DevBroker, DevBrokerError
from loom.graph import add_command as add_graph_command


def _topic_spec(spec: str) -> tuple[str, int]:
    """``name[:partitions]``; without a count the broker's default (-1) applies."""
    name, _, partitions = spec.partition(":")
    return name, int(partitions) if partitions else -1


def _dev_broker(args: argparse.Namespace) -> int:
    try:
        broker = DevBroker(host=args.host, port=args.port).start()
    except DevBrokerError as exc:
        print(f"loom dev-broker: {exc}", file=sys.stderr)
        return 1
    try:
        broker.create_topics(dict(_topic_spec(spec) for spec in args.topic))
        print(f"Kafka-protocol broker (Tansu, in memory) on {broker.bootstrap_servers}", flush=True)
        print(f"export LOOM_KAFKA__BOOTSTRAP_SERVERS={broker.bootstrap_servers}", flush=True)
        stopped = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopped.set())
        signal.signal(signal.SIGINT, lambda *_: stopped.set())
        stopped.wait()
    finally:
        broker.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    broker = commands.add_parser(
        "dev-broker", help="run a throwaway Kafka-protocol broker on loopback (dev/test only)"
    )
    broker.add_argument("--host", default="127.0.0.1")
    broker.add_argument("--port", type=int, default=9092)
    broker.add_argument(
        "--topic",
        action="append",
        default=[],
        metavar="NAME[:PARTITIONS]",
        help="create a topic at start (repeatable)",
    )
    broker.set_defaults(handler=_dev_broker)
    add_graph_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
