"""Async step throughput: 10 ms of simulated I/O per record, 100 calls in flight.

A ``WithAsync`` step that awaits ``anyio.sleep(0.01)`` with
``max_concurrency=100`` can finish at most 100 / 0.01 s = 10,000 records/s per
worker. This runs such a flow over N records on each backend (asyncio,
asyncio + uvloop, trio) on the real Bytewax runtime, with in-memory topics
(``TestRunner``) and optionally a real Kafka-protocol broker (``--broker``,
the Tansu dev broker from ``loom.devtools.broker``), and prints records/s and
the ratio to that ceiling (target: >= 80 %).

Besides throughput, each run reports what explains a shortfall:

* ``peak``: most calls observed in flight at once (should be max_concurrency);
* ``avg``: mean calls in flight while the step was busy (Little's law:
  throughput x mean call time); ``avg`` well below ``peak`` means the window
  is not kept full;
* ``io ms``: mean time one simulated 10 ms call really took; above 10 ms the
  event loop thread ran late (it waited for the GIL or a CPU);
* ``cpu us/rec``: process CPU time per record, all threads; the GIL lets at
  most ~1 CPU-second per second do Python work, so 10,000 records/s needs
  well under 100 us per record;
* ``cpu``: process CPU time over wall time; near 100 % the process is bound
  by one core (the GIL), whatever the concurrency allows.

Usage (from the repository root)::

    python bench/async_throughput.py                   # 20,000 records, 3 runs each
    python bench/async_throughput.py --broker          # also through the dev broker
    python bench/async_throughput.py --records 5000 --repeat 1 --backends trio
    python bench/async_throughput.py --check           # exit 1 below the target
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec

from loom.streaming import FromTopic, IntoTopic, Process, StreamFlow, WithAsync
from loom.streaming.bytewax.runner import BytewaxRuntimeConfig, StreamingRunner
from loom.streaming.testing import TestRunner

BACKENDS: dict[str, BytewaxRuntimeConfig] = {
    "asyncio": BytewaxRuntimeConfig(async_backend="asyncio"),
    "uvloop": BytewaxRuntimeConfig(async_backend="asyncio", use_uvloop=True),
    "trio": BytewaxRuntimeConfig(async_backend="trio"),
}


class Order(msgspec.Struct, frozen=True):
    id: str
    amount: float


# -- the measured step -----------------------------------------------------------


@dataclass
class Probe:
    """What the step observes; touched only by the event loop thread."""

    io_s: float
    current: int = 0
    peak: int = 0
    calls: int = 0
    first_start: float = 0.0
    last_end: float = 0.0
    io_time: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    expected: int = 0

    def make_step(self) -> Callable[[Order], Any]:
        async def simulated_io(order: Order) -> Order:
            start = time.perf_counter()
            if not self.calls:
                self.first_start = start
            self.calls += 1
            self.current += 1
            self.peak = max(self.peak, self.current)
            await anyio.sleep(self.io_s)
            end = time.perf_counter()
            self.current -= 1
            self.io_time += end - start
            self.last_end = end
            if self.calls == self.expected and self.current == 0:
                self.done.set()
            return order

        return simulated_io


def flow(probe: Probe, concurrency: int) -> StreamFlow[Order, Order]:
    return StreamFlow(
        "bench_async",
        source=FromTopic("input", payload=Order),
        process=Process(WithAsync(probe.make_step(), max_concurrency=concurrency)),
        output=IntoTopic("output"),
        errors=IntoTopic("dlq"),
    )


@dataclass
class Sample:
    records: int
    wall_s: float
    """From the start of run() until it returned (start-up and drain included)."""
    busy_s: float
    """From the first call starting to the last call finishing."""
    cpu_s: float
    probe: Probe

    @property
    def rate(self) -> float:
        return self.records / self.busy_s

    @property
    def wall_rate(self) -> float:
        return self.records / self.wall_s

    @property
    def mean_in_flight(self) -> float:
        return self.probe.io_time / self.busy_s

    @property
    def mean_io_ms(self) -> float:
        return self.probe.io_time / self.probe.calls * 1000

    @property
    def cpu_us_per_record(self) -> float:
        return self.cpu_s / self.records * 1e6


def payloads(count: int) -> Iterator[bytes]:
    encode = msgspec.json.encode
    for index in range(count):
        yield encode(Order(f"o{index}", float(index)))


# -- in-memory topics -------------------------------------------------------------------


def run_memory(
    runtime: BytewaxRuntimeConfig, records: int, concurrency: int, io_s: float
) -> Sample:
    probe = Probe(io_s, expected=records)
    tester = TestRunner(flow(probe, concurrency))
    for value in payloads(records):
        tester.send(value)
    wall, cpu = time.perf_counter(), time.process_time()
    result = tester.run(runtime=runtime, timeout_s=600)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    written = len(result.records("output"))
    if written != records or probe.calls != records:
        raise RuntimeError(f"expected {records} outputs and calls, got {written}/{probe.calls}")
    return Sample(records, wall, probe.last_end - probe.first_start, cpu, probe)


# -- the dev broker ---------------------------------------------------------------


def run_broker(
    bootstrap: str,
    runtime: BytewaxRuntimeConfig,
    records: int,
    concurrency: int,
    io_s: float,
) -> Sample:
    from confluent_kafka import Producer  # noqa: PLC0415
    from confluent_kafka.admin import AdminClient, NewTopic  # noqa: PLC0415

    suffix = uuid.uuid4().hex[:8]
    topics = {name: f"bench-{name}-{suffix}" for name in ("input", "output", "dlq")}
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(t, 1) for t in topics.values()]).values():
        future.result()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for value in payloads(records):
        while True:
            try:
                producer.produce(topics["input"], value)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(60):
        raise RuntimeError("could not produce the input records")

    probe = Probe(io_s, expected=records)
    runner = StreamingRunner.from_dict(
        flow(probe, concurrency),
        {
            "kafka": {
                "bootstrap_servers": bootstrap,
                "group_id": f"bench-{suffix}",
                "consumer": {"enable.auto.commit": False, "auto.offset.reset": "earliest"},
            },
            "topics": topics,
        },
    )
    failure: list[BaseException] = []

    def target() -> None:
        try:
            runner.run(runtime=runtime)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="bench-run", daemon=True)
    wall, cpu = time.perf_counter(), time.process_time()
    thread.start()
    finished = probe.done.wait(600)
    runner.request_stop()
    thread.join(60)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if failure:
        raise failure[0]
    if not finished or thread.is_alive():
        raise RuntimeError(f"the broker run did not finish ({probe.calls}/{records} calls)")
    return Sample(records, wall, probe.last_end - probe.first_start, cpu, probe)


# -- report ---------------------------------------------------------------------


def report(label: str, backend: str, samples: list[Sample], ceiling: float, target: float) -> bool:
    ordered = sorted(samples, key=lambda s: s.rate)
    median = ordered[(len(ordered) - 1) // 2]
    ratio = median.rate / ceiling
    ok = ratio >= target
    print(
        f"{label:7} {backend:8} {median.rate:9,.0f} {ratio:7.1%} {'ok' if ok else 'MISS':5}"
        f"{max(s.rate for s in samples):9,.0f} {median.wall_rate:9,.0f}"
        f"{median.probe.peak:6d} {median.mean_in_flight:6.1f} {median.mean_io_ms:7.2f}"
        f"{median.cpu_us_per_record:11.0f}{median.cpu_s / median.wall_s:7.0%}",
        flush=True,
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--io-ms", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3, help="runs per backend (median shown)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--broker", action="store_true", help="also run through the dev broker")
    parser.add_argument("--no-memory", action="store_true", help="skip the in-memory runs")
    parser.add_argument("--check", action="store_true", help="exit 1 if a backend misses")
    args = parser.parse_args(argv)

    io_s = args.io_ms / 1000
    ceiling = args.concurrency / io_s
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.records:,} records, max_concurrency={args.concurrency}, "
        f"{args.io_ms:g} ms simulated I/O: ceiling {ceiling:,.0f} records/s per worker, "
        f"target {args.target:.0%}; {os.cpu_count()} CPUs, load {load:.2f}, "
        f"Python {sys.version.split()[0]}, median of {args.repeat}"
    )
    print(
        f"{'topics':7} {'backend':8} {'rec/s':>9} {'ratio':>7} {'':5}{'best':>9} "
        f"{'e2e rec/s':>9}{'peak':>6} {'avg':>6} {'io ms':>7}{'cpu us/rec':>11}{'cpu':>7}"
    )
    everything_ok = True
    runs: list[tuple[str, Callable[[BytewaxRuntimeConfig], Sample]]] = []
    if not args.no_memory:
        runs.append(("memory", lambda rt: run_memory(rt, args.records, args.concurrency, io_s)))
    broker = None
    if args.broker:
        from loom.devtools.broker import DevBroker  # noqa: PLC0415

        broker = DevBroker().start()
        address = broker.bootstrap_servers
        runs.append(
            ("broker", lambda rt: run_broker(address, rt, args.records, args.concurrency, io_s))
        )
    try:
        for label, measure in runs:
            for name in backends:
                samples = [measure(BACKENDS[name]) for _ in range(args.repeat)]
                everything_ok &= report(label, name, samples, ceiling, args.target)
    finally:
        if broker is not None:
            broker.stop()
    return 0 if everything_ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
