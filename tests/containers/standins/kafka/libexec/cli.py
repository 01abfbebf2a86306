"""The Kafka CLI tools the compose file runs, on top of Tansu's CLI.

- kafka-broker-api-versions.sh --bootstrap-server HOST:PORT (a Metadata round trip)
- kafka-topics.sh --bootstrap-server HOST:PORT --create [--if-not-exists] --topic NAME
  [--partitions N] [--replication-factor N]
- kafka-topics.sh --bootstrap-server HOST:PORT --list
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time

TANSU = "/opt/kafka/libexec/tansu"


def reachable(server: str, timeout_s: float) -> bool:
    """Tansu's own client retries a refused connection for ~25 s: probe first."""
    host, _, port = server.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)


def topics(server: str) -> list[str]:
    done = subprocess.run(
        [TANSU, "topic", "list", "--broker", f"tcp://{server}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return [topic["name"] for topic in json.loads(done.stdout or "[]")]


def main() -> int:
    tool = sys.argv[1]
    parser = argparse.ArgumentParser(prog=tool)
    parser.add_argument("--bootstrap-server", required=True)
    if tool == "kafka-topics.sh":
        parser.add_argument("--create", action="store_true")
        parser.add_argument("--list", action="store_true")
        parser.add_argument("--if-not-exists", action="store_true")
        parser.add_argument("--topic")
        parser.add_argument("--partitions", type=int, default=1)
        parser.add_argument("--replication-factor", type=int, default=1)
    args = parser.parse_args(sys.argv[2:])
    server = args.bootstrap_server.split(",")[0]
    if not reachable(server, 0 if tool == "kafka-broker-api-versions.sh" else 30):
        print(f"{tool}: cannot reach {server}", file=sys.stderr)
        return 1
    if tool == "kafka-broker-api-versions.sh":
        topics(server)  # a real Kafka-protocol round trip (Metadata)
        print(f"{server}: reachable (Tansu)")
        return 0
    if args.list:
        print("\n".join(topics(server)))
        return 0
    if not (args.create and args.topic):
        parser.error("only --create --topic NAME and --list are supported")
    if args.if_not_exists and args.topic in topics(server):
        return 0
    subprocess.run(
        [
            TANSU,
            "topic",
            "create",
            args.topic,
            "--broker",
            f"tcp://{server}",
            "--partitions",
            str(args.partitions),
        ],
        timeout=30,
        check=True,
    )
    print(f"Created topic {args.topic}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
