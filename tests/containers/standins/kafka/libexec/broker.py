"""apache/kafka stand-in: Tansu (a Kafka-protocol broker, in memory) started from
the same KAFKA_* variables the compose file gives the real image.

The inter-broker listener (KAFKA_INTER_BROKER_LISTENER_NAME, e.g. INTERNAL
on :29092) is Tansu's listener, advertised at the same loopback address: with
host networking every container and the host reach it there. The other
client listeners (e.g. EXTERNAL on :9092) forward to it. The controller
listener is not needed (Tansu has no KRaft quorum). An empty host means
127.0.0.1: the stand-in only listens on loopback.
SIGTERM/SIGINT stop Tansu with SIGINT (it ignores SIGTERM while clients are
connected) and exit 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

TANSU = "/opt/kafka/libexec/tansu"


def listeners() -> dict[str, tuple[str, int]]:
    found = {}
    for item in os.environ.get("KAFKA_LISTENERS", "PLAINTEXT://:9092").split(","):
        name, _, address = item.strip().partition("://")
        host, _, port = address.rpartition(":")
        found[name] = (host.strip("[]") or "127.0.0.1", int(port))
    return found


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def forward(
    target: tuple[str, int], client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
) -> None:
    try:
        broker_r, broker_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(pipe(client_r, broker_w), pipe(broker_r, client_w))


async def main() -> int:
    found = listeners()
    controllers = set(os.environ.get("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER").split(","))
    inter = os.environ.get("KAFKA_INTER_BROKER_LISTENER_NAME") or next(
        name for name in found if name not in controllers
    )
    host, port = found[inter]
    url = f"tcp://{host}:{port}"
    broker = await asyncio.create_subprocess_exec(
        TANSU,
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
        env={k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "OTEL_"))},
    )
    servers = []
    for name, address in found.items():
        if name in controllers or name == inter:
            continue
        servers.append(
            await asyncio.start_server(
                lambda r, w: forward((host, port), r, w), address[0], address[1]
            )
        )
        print(f"stand-in: {name} {address[0]}:{address[1]} -> {url}", flush=True)
    print(f"stand-in: Tansu broker on {url}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    waiter = asyncio.ensure_future(broker.wait())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.close()
    if broker.returncode is None:
        broker.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(broker.wait(), 10)
        except TimeoutError:
            broker.kill()
        return 0
    print(f"stand-in: Tansu exited with {broker.returncode}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
