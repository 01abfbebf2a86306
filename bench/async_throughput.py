"""Async step throughput: 10 ms of simulated I/O per record, 100 calls in flight.

A ``WithAsync`` step that awaits ``anyio.sleep(0.01)`` with
``max_concurrency=100`` can finish at most 100 / 0.01 s = 10,000 records/s per
worker. This runs such a flow over N records on each backend (asyncio,
asyncio + uvloop, trio) on the real Bytewax runtime, with in-memory topics
(``TestRunner``) and optionally a real Kafka-protocol broker (``--broker``,
the Tansu dev broker from ``loom.devtools.broker``), and prints records/s and
the ratio to that ceiling (target: >= 80 %).

The peer, measured in the same run
----------------------------------

Next to each Loom row is a ``peer`` row: a hand-written async program doing
the same work with no framework, the practical limit of that event loop. A
fixed pool of ``max_concurrency`` worker coroutines shares one iterator over
a Python list of the same encoded records; each worker decodes a record as
``FromTopic(payload=Order)`` does (``msgspec.json.Decoder(Order)``), awaits
the very same step function (``anyio.sleep(0.01)`` plus the probe below; the
step returns the order unchanged, there is nothing to derive), encodes the
result as ``IntoTopic`` does (``msgspec.json.Encoder``) and appends it to an
output list (an exception would go to an error list, as Loom's goes to the
DLQ). The pool is an ``asyncio.TaskGroup`` under ``asyncio.Runner`` (with
``loop_factory=uvloop.new_event_loop`` for uvloop) and a trio nursery under
``trio.run``. Unlike Loom, the peer keeps no input order, commits nothing and
crosses no threads. Every run checks which event loop the step really ran on
and fails if it is not the backend's (e.g. uvloop that silently fell back to
the default asyncio loop).

Runs are interleaved (Loom run 1, peer run 1, Loom run 2, ...) and both rows
show their median. ``loom/peer`` is Loom's median records/s over the peer's
median: 1.00x means Loom adds no cost over a bare event loop, 0.80x means it
loses a fifth of what the loop can do. ``ceiling`` is the % of the 10,000
records/s ceiling; ``--check`` and ``ok``/``MISS`` judge Loom on that alone.

The peer is always in-memory: there is no broker-based peer, so with
``--broker`` the broker rows are compared with the in-memory peer (measured
in the same run) and their ``loom/peer`` also counts the broker's cost.

What explains a shortfall
-------------------------

Besides throughput, each run (Loom's and the peer's) reports:

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
  by one core (the GIL), whatever the concurrency allows;
* ``loop``: the event loop the step ran on (asyncio, uvloop or trio).

Usage (from the repository root)::

    .venv/bin/python bench/async_throughput.py          # 20,000 records, 3 runs each
    .venv/bin/python bench/async_throughput.py --broker # also through the dev broker
    .venv/bin/python bench/async_throughput.py --records 5000 --repeat 1  # quick look
    .venv/bin/python bench/async_throughput.py --records 5000 --repeat 1 --backends trio
    .venv/bin/python bench/async_throughput.py --check  # exit 1 below the target
"""

from __future__ import annotations

import argparse
import asyncio
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
import sniffio
import trio
import uvloop

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
    loop: str = ""
    """The event loop the first call ran on (see :func:`running_loop`)."""

    def make_step(self) -> Callable[[Order], Any]:
        async def simulated_io(order: Order) -> Order:
            start = time.perf_counter()
            if not self.calls:
                self.first_start = start
                self.loop = running_loop()
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


def running_loop() -> str:
    """The event loop running the caller: ``asyncio``, ``uvloop`` or ``trio``."""
    if sniffio.current_async_library() == "trio":
        return "trio"
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


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
    from confluent_kafka.admin import AdminClient  # noqa: PLC0415
    from confluent_kafka.cimpl import NewTopic  # noqa: PLC0415

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


# -- the peer: the same work on a bare event loop -----------------------------------


def run_peer(backend: str, records: int, concurrency: int, io_s: float) -> Sample:
    """The same records and step on a hand-written worker pool, in memory, no framework."""
    inputs = list(payloads(records))
    probe = Probe(io_s, expected=records)
    step = probe.make_step()
    decode = msgspec.json.Decoder(Order).decode
    encode = msgspec.json.Encoder().encode
    outputs: list[bytes] = []
    errors: list[Exception] = []

    async def worker(source: Iterator[bytes]) -> None:
        for value in source:  # the workers share the iterator: each takes the next record
            try:
                outputs.append(encode(await step(decode(value))))
            except Exception as exc:
                errors.append(exc)

    workers = min(concurrency, records)

    async def asyncio_pool() -> None:
        source = iter(inputs)
        async with asyncio.TaskGroup() as group:
            for _ in range(workers):
                group.create_task(worker(source))

    async def trio_pool() -> None:
        source = iter(inputs)
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(worker, source)

    wall, cpu = time.perf_counter(), time.process_time()
    if backend == "trio":
        trio.run(trio_pool)
    else:
        factory = uvloop.new_event_loop if backend == "uvloop" else None
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(asyncio_pool())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if errors:
        raise RuntimeError(f"the peer failed {len(errors)} records") from errors[0]
    if len(outputs) != records or probe.calls != records:
        raise RuntimeError(
            f"peer: expected {records} outputs and calls, got {len(outputs)}/{probe.calls}"
        )
    return Sample(records, wall, probe.last_end - probe.first_start, cpu, probe)


def on_loop(backend: str, sample: Sample) -> Sample:
    """``sample``, after checking that its step ran on ``backend``'s event loop."""
    if sample.probe.loop != backend:
        raise RuntimeError(f"the {backend} run's step ran on {sample.probe.loop or 'nothing'}")
    return sample


# -- report ---------------------------------------------------------------------


def median(samples: list[Sample]) -> Sample:
    """The median run by records/s (the lower one of the middle two)."""
    ordered = sorted(samples, key=lambda s: s.rate)
    return ordered[(len(ordered) - 1) // 2]


def row(
    topics: str, backend: str, who: str, samples: list[Sample], *, ceiling: float, note: str = ""
) -> str:
    """One table row; ``note`` fills the verdict and ``loom/peer`` columns (Loom's row only)."""
    sample = median(samples)
    return (
        f"{topics:7} {backend:8} {who:5}{sample.rate:9,.0f} {sample.rate / ceiling:7.1%} {note:14}"
        f"{max(s.rate for s in samples):9,.0f} {sample.wall_rate:9,.0f}"
        f"{sample.probe.peak:6d} {sample.mean_in_flight:6.1f} {sample.mean_io_ms:7.2f}"
        f"{sample.cpu_us_per_record:11.0f}{sample.cpu_s / sample.wall_s:7.0%}"
        f"  {sample.probe.loop}"
    )


def report(
    label: str,
    backend: str,
    samples: list[Sample],
    peer: list[Sample],
    *,
    ceiling: float,
    target: float,
) -> bool:
    """Print Loom's row (judged on the ceiling) and its peer's; True if Loom hit the target."""
    rate = median(samples).rate
    ok = rate / ceiling >= target
    note = f"{'ok' if ok else 'MISS':5}{rate / median(peer).rate:8.2f}x"
    print(row(label, backend, "loom", samples, ceiling=ceiling, note=note))
    print(row("memory", backend, "peer", peer, ceiling=ceiling), flush=True)
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
        "peer: the same step, decode and encode on a bare worker pool, in memory "
        "(no framework, no broker); loom/peer = Loom's median rec/s / the peer's"
    )
    print(
        f"{'topics':7} {'backend':8} {'run':5}{'rec/s':>9} {'ceiling':>7} {'':5}{'loom/peer':>9}"
        f"{'best':>9} {'e2e rec/s':>9}{'peak':>6} {'avg':>6} {'io ms':>7}{'cpu us/rec':>11}"
        f"{'cpu':>7}  loop"
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
                samples: list[Sample] = []
                peer: list[Sample] = []
                for _ in range(args.repeat):  # interleaved: Loom run i, then peer run i
                    samples.append(on_loop(name, measure(BACKENDS[name])))
                    peer.append(on_loop(name, run_peer(name, args.records, args.concurrency, io_s)))
                everything_ok &= report(
                    label, name, samples, peer, ceiling=ceiling, target=args.target
                )
    finally:
        if broker is not None:
            broker.stop()
    return 0 if everything_ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
