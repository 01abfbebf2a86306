"""Stop latency with a stuck async call: how long after force_shutdown_timeout_ms a run returns.

    .venv/bin/python bench/shutdown.py [--runs 5] [--timeouts-ms 200,500,1000]
        [--backend asyncio|trio]

In memory (``TestRunner``, no broker): five records, the third one's async
call never returns. Once it is stuck and the two before it are out, the
input ends and the drain starts; the run gives up on the stuck call after
``force_shutdown_timeout_ms`` and returns. The clock runs from the moment the
drain is requested until ``run()`` returns, so the figure is the timeout plus
Loom's overshoot (the drain's polling, closing the event loop, Bytewax
stopping). Prints the median, min and max per timeout and the median
overshoot; on an idle machine it stays under ~0.3 s.

The test suite only checks what load cannot break (the run returns, and not
before the timeout); this is where the "how soon" is measured.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import threading
import time

import anyio
import msgspec

from loom.config.runtime import BytewaxRuntimeConfig
from loom.streaming import Drain, FromTopic, Process, StreamFlow, WithAsync
from loom.streaming.testing import RunResult, TestRunner


class Order(msgspec.Struct):
    id: str


def stop_seconds(timeout_ms: int, backend: str) -> float:
    stuck = threading.Event()

    async def lookup(order: Order) -> Order:
        if order.id == "o2":
            stuck.set()
            await anyio.sleep_forever()
        return order

    flow: StreamFlow[Order, Order] = StreamFlow(
        "shutdown-bench",
        source=FromTopic("input", payload=Order),
        process=Process(WithAsync(lookup, max_concurrency=10), Drain()),
        errors=Drain(),
    )
    tester = TestRunner(flow)
    tester.send_all([Order(f"o{i}") for i in range(5)])
    requested: list[float] = []

    def until(result: RunResult) -> bool:
        if stuck.is_set() and not requested:
            requested.append(time.monotonic())
        return bool(requested)

    runtime = BytewaxRuntimeConfig(async_backend=backend, force_shutdown_timeout_ms=timeout_ms)
    tester.run(runtime=runtime, until=until, timeout_s=60)
    return time.monotonic() - requested[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeouts-ms", default="200,500,1000")
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the drain's and the bridge's expected warnings
    print(f"{'timeout':>9} {'median':>8} {'min':>7} {'max':>7} {'overshoot':>10}")
    for timeout_ms in (int(value) for value in args.timeouts_ms.split(",")):
        took = [stop_seconds(timeout_ms, args.backend) for _ in range(args.runs)]
        median = statistics.median(took)
        print(
            f"{timeout_ms:>6} ms {median:>7.3f}s {min(took):>6.3f}s {max(took):>6.3f}s"
            f" {median - timeout_ms / 1000:>+9.3f}s"
        )


if __name__ == "__main__":
    main()
