"""Stateful processing side by side with its peers: windows, dedup, memory per key.

    .venv/bin/python bench/windows.py [--records 1000000] [--keys 10000] [--runs 3]

One Tansu broker (``loom.devtools.broker.DevBroker``), every peer in its own
subprocess (``stateful_peers.py``), the same input for every peer, the median
of ``--runs`` interleaved runs, ratios printed against the peers measured in
the same run. Three parts (``--parts``):

``windows``
    Per key, count and sum of ``amount`` in epoch-aligned 1-s tumbling
    event-time windows. ``--records`` records over ``--keys`` keys (drawn
    uniformly with a fixed seed), with explicit Kafka timestamps spread evenly
    over ``--span-s`` seconds of event time, ending an hour before the run
    (so no peer's wall clock can matter); then one closing record per key,
    10 s of event time after the last one, which closes every key's last
    window in every peer by event time alone (Bytewax's and Quix Streams'
    windows close per key). Peers: Loom ``WindowAggregate(Tumbling(1000),
    CountSum())``, Bytewax ``EventClock + TumblingWindower + fold_window``,
    Quix Streams ``tumbling_window(1000).agg(count=Count(), sum=Sum()).final()``.
    The clock runs from the peer's first record decoded to the harness
    receiving the last expected window result; every peer's results are
    compared, (key, window) by (key, window), with the harness's own count
    and sum over the records it produced. The closing records' own windows
    stay open and are not expected.

``dedup``
    Loom ``StatefulStep`` dropping records whose id (the Kafka key) was seen
    before, against the same flow with a stateless ``RecordStep`` passthrough
    (``--dup-fraction`` of the records repeat an earlier id), first record
    decoded to last output record.

``memory``
    RSS growth of a peer process while it takes on ``--memory-keys`` new
    keys (after a warm-up of ``--memory-warmup`` keys), divided by the keys:
    Loom's dedup ``StatefulStep`` and a ``WindowAggregate`` holding one open
    1-hour window per key, next to Loom's stateless passthrough on the same
    input (its growth is buffers, not state) and the same flows in Bytewax and
    Quix Streams.

Loom runs with a durable state directory (a fresh temporary one per run,
the production configuration); ``--loom-volatile`` also runs it with
``state.durability = "volatile"``. See bench/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec
from confluent_kafka import OFFSET_BEGINNING, Producer, TopicPartition
from confluent_kafka.cimpl import NewTopic
from harness import (
    BenchError,
    Cluster,
    CpuSnapshot,
    log_directory,
    process_cpu_s,
    wait_for,
    wait_for_quiet,
)
from run import machine
from stateful_peers import Event, Reading

import loom
from loom.devtools.broker import DevBroker

BENCH_DIR = Path(__file__).resolve().parent
PEERS_SCRIPT = BENCH_DIR / "stateful_peers.py"
STARTUP_TIMEOUT_S = 90.0
STALL_TIMEOUT_S = 30.0

WINDOW_TARGETS = {"bytewax": 2.0, "quix": 4.0}
"""Loom / peer records/s for the window benchmark (issue 15, item 8)."""
DEDUP_TARGET = 0.7
"""Loom StatefulStep dedup / the same flow stateless."""

LABELS = {
    "loom": "Loom WindowAggregate (durable state)",
    "loom-volatile": "Loom WindowAggregate (volatile state)",
    "bytewax": "Bytewax EventClock+fold_window",
    "quix": "Quix Streams tumbling_window().agg()",
}
DEDUP_LABELS = {
    "loom-passthrough": "Loom RecordStep passthrough (stateless)",
    "loom-dedup": "Loom StatefulStep dedup (durable state)",
    "loom-dedup-volatile": "Loom StatefulStep dedup (volatile state)",
    "bytewax-dedup": "Bytewax stateful_map dedup",
    "quix-dedup": "Quix Streams stateful filter dedup",
}
MEMORY_LABELS = {
    "loom-passthrough": "Loom RecordStep passthrough (no state)",
    "loom-dedup": "Loom StatefulStep dedup (durable)",
    "loom-dedup-volatile": "Loom StatefulStep dedup (volatile)",
    "loom-window": "Loom WindowAggregate, 1 open window/key (durable)",
    "loom-window-volatile": "Loom WindowAggregate, 1 open window/key (volatile)",
    "bytewax-dedup": "Bytewax stateful_map dedup",
    "bytewax-window": "Bytewax fold_window, 1 open window/key",
    "quix-dedup": "Quix Streams stateful filter dedup (RocksDB)",
    "quix-window": "Quix Streams tumbling_window, 1 open window/key",
}

_encode = msgspec.json.Encoder().encode
_QUIET = {"log_level": 0}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


# -- inputs ---------------------------------------------------------------------


Row = tuple[bytes, bytes, int]
"""(Kafka key, value, Kafka timestamp ms)."""


@dataclass(frozen=True)
class WindowInput:
    """The window benchmark's records; the same rows every time they are generated."""

    records: int
    keys: int
    span_ms: int
    window_ms: int
    end_ms: int
    """Event time of the last record (before the closing records)."""
    seed: int = 15

    @property
    def start_ms(self) -> int:
        return self.end_ms - self.span_ms

    @property
    def closing_ms(self) -> int:
        """The closing records' timestamp: 10 s after the last record, a window of its own."""
        return self.end_ms + 10_000

    @property
    def total(self) -> int:
        return self.records + self.keys

    def key(self, index: int) -> str:
        return f"k{index:06d}"

    def rows(self) -> Iterator[Row]:
        rng = random.Random(self.seed)
        randrange = rng.randrange
        start, span, count = self.start_ms, self.span_ms, self.records
        for i in range(count):
            key = self.key(randrange(self.keys))
            amount = randrange(1, 10_000)
            yield (
                key.encode(),
                _encode(Reading(f"r{i:09d}", key, amount)),
                start + i * span // count,
            )
        for k in range(self.keys):
            key = self.key(k)
            yield key.encode(), _encode(Reading(f"s{k:09d}", key, 0)), self.closing_ms

    def expected(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(key, window start ms) -> (count, sum), computed here from the rows produced."""
        size = self.window_ms
        found: dict[tuple[str, int], list[int]] = {}
        for key, value, ts in self.rows():
            if ts == self.closing_ms:
                continue
            reading = msgspec.json.decode(value, type=Reading)
            slot = found.setdefault((key.decode(), ts - ts % size), [0, 0])
            slot[0] += 1
            slot[1] += reading.amount
        return {k: (v[0], v[1]) for k, v in found.items()}


@dataclass(frozen=True)
class DedupInput:
    """Events keyed by id; ``dup_fraction`` of them repeat an id seen shortly before."""

    records: int
    dup_fraction: float
    prefix: str = "e"
    seed: int = 16

    def rows(self) -> Iterator[Row]:
        rng = random.Random(self.seed)
        random_ = rng.random
        fresh = 0
        now_ms = int(time.time() * 1000)
        for i in range(self.records):
            if fresh and random_() < self.dup_fraction:
                number = max(0, fresh - 1 - int(random_() * 1000))  # one of the last 1,000 ids
            else:
                number = fresh
                fresh += 1
            event_id = f"{self.prefix}{number:09d}"
            value = _encode(Event(event_id, f"c-{i % 5000:05d}", 1 + i % 997, "DE"))
            yield event_id.encode(), value, now_ms

    def unique(self) -> set[str]:
        return {key.decode() for key, _, _ in self.rows()}


def memory_rows(flow: str, keys: int, prefix: str, ts_ms: int) -> Iterator[Row]:
    """``keys`` distinct keys, one record each, all at ``ts_ms``: one state entry per key.

    The window flows read :class:`Reading` (every record in the same window);
    the dedup and passthrough flows read :class:`Event`.
    """
    for k in range(keys):
        key = f"{prefix}{k:09d}"
        if flow == "window":
            value = _encode(Reading(key, key, 1))
        else:
            value = _encode(Event(key, f"c-{k % 5000:05d}", 1 + k % 997, "DE"))
        yield key.encode(), value, ts_ms


def produce_rows(cluster: Cluster, topic: str, rows: Iterator[Row]) -> int:
    """Produce every row (explicit timestamps, ordered per partition); returns the count."""
    producer: Producer = cluster.producer(**{"enable.idempotence": True})
    produce, poll = producer.produce, producer.poll
    count = 0
    for key, value, ts in rows:
        while True:
            try:
                produce(topic, value, key, timestamp=ts)
                break
            except BufferError:
                poll(0.05)
        count += 1
    remaining = producer.flush(120)
    if remaining:
        raise BenchError(f"{remaining} input records were not delivered to {topic}")
    return count


# -- topics, processes ---------------------------------------------------------


TOPIC_CONFIG = {"retention.ms": str(7 * 24 * 3_600_000), "retention.bytes": "-1"}
"""Kafka's defaults, set explicitly: Tansu describes a topic's configs only when set,
and Quix Streams' windows need ``retention.ms`` to derive their changelog config."""


def create_topics(cluster: Cluster, partitions: int, *names: str) -> None:
    futures = cluster.admin.create_topics(
        [
            NewTopic(name, 1 if name.startswith("dlq-") else partitions, config=TOPIC_CONFIG)
            for name in names
        ],
        request_timeout=15,
    )
    for future in futures.values():
        future.result(timeout=15)
    wait_for(
        lambda: all(name in cluster.admin.list_topics(timeout=5).topics for name in names),
        15,
        "the new topics to appear in metadata",
    )


def delete_topics(cluster: Cluster, *names: str) -> None:
    futures = cluster.admin.delete_topics(list(names), request_timeout=15)
    for future in futures.values():
        with contextlib.suppress(Exception):
            future.result(timeout=15)


def split_peer(peer: str) -> tuple[str, str, bool]:
    """``loom-dedup-volatile`` -> (framework ``loom``, flow ``dedup``, volatile)."""
    parts = peer.split("-")
    volatile = parts[-1] == "volatile"
    if volatile:
        parts = parts[:-1]
    return parts[0], (parts[1] if len(parts) > 1 else "window"), volatile


@dataclass
class Peer:
    """One stateful peer subprocess, its log and state directory in ``work_dir``."""

    name: str
    """``loom``, ``bytewax`` or ``quix``."""
    config: dict[str, Any]
    work_dir: Path
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0

    @property
    def log_path(self) -> Path:
        return self.work_dir / f"{self.name}.log"

    @property
    def first_read_path(self) -> Path:
        return self.work_dir / "first-read"

    def start(self) -> Peer:
        self.config["first_read_file"] = str(self.first_read_path)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("wb") as log:
            self.started = time.time()
            self.process = subprocess.Popen(
                [sys.executable, str(PEERS_SCRIPT), self.name, json.dumps(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.work_dir,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def first_read(self) -> float | None:
        try:
            text = self.first_read_path.read_text()
        except OSError:
            return None
        return float(text) if text else None

    def check_alive(self) -> None:
        assert self.process is not None
        code = self.process.poll()
        if code is not None:
            raise BenchError(f"peer {self.name} exited early with code {code}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 20.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and VmHWM (peak RSS) of a live process, in KiB."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|RssAnon|VmHWM):\s+(\d+) kB", status, re.M)}


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


def peer_config(
    cluster: Cluster,
    peer: str,
    topics: dict[str, str],
    partitions: int,
    state_dir: Path,
    **extra: Any,
) -> tuple[str, dict[str, Any]]:
    framework, flow, volatile = split_peer(peer)
    config = {
        "bootstrap": cluster.bootstrap,
        "input": topics["input"],
        "output": topics["output"],
        "dlq": topics["dlq"],
        "partitions": partitions,
        "group": f"bench-{peer}-{uuid.uuid4().hex[:8]}",
        "flow": flow,
        "state_dir": None if volatile else str(state_dir),
        **extra,
    }
    if framework == "quix":
        config["state_dir"] = str(state_dir)
    return framework, config


# -- one throughput run ----------------------------------------------------------


@dataclass
class Run:
    peer: str
    input_records: int
    expected_outputs: int
    rate: float = 0.0
    """Input records per second, first record decoded to last expected output received."""
    seconds: float = 0.0
    startup_s: float = 0.0
    """Process start to its first record decoded."""
    committed_rate: float | None = None
    """Input records per second to every input offset committed (peers that commit)."""
    outputs: int = 0
    peak_rss_mib: float = 0.0
    state_dir_mib: float = 0.0
    peer_cpu_s: float = 0.0
    broker_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    verified: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.verified

    @property
    def cpu_us_per_record(self) -> float:
        return 1e6 * self.peer_cpu_s / self.input_records if self.input_records else 0.0


COMMITTING = frozenset({"loom", "quix"})


@dataclass
class Job:
    """What one throughput run reads, how many outputs end it, and how they are checked."""

    input_topic: str
    partitions: int
    input_records: int
    expected_outputs: int
    counts: Callable[[bytes], bool]
    """Whether an output record is one of ``expected_outputs`` (cheap: the clock is running)."""
    verify: Callable[[list[tuple[bytes, bytes]]], str | None]
    """All outputs -> an error message, or None."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Added to the peer's config."""


def timed_run(cluster: Cluster, peer: str, job: Job, work_root: Path) -> Run:
    """Run ``peer`` over the records waiting in ``job.input_topic`` until its outputs are out.

    After the clock stops the harness reads for one more second, so
    duplicates show, then hands every output to ``job.verify``.
    """
    result = Run(peer, job.input_records, job.expected_outputs)
    tag = f"{peer}-{uuid.uuid4().hex[:8]}"
    topics = {"input": job.input_topic, "output": f"out-{tag}", "dlq": f"dlq-{tag}"}
    create_topics(cluster, job.partitions, topics["output"], topics["dlq"])
    work_dir = Path(tempfile.mkdtemp(prefix=f"{peer}-", dir=work_root))
    state_dir = work_dir / "state"
    framework, config = peer_config(cluster, peer, topics, job.partitions, state_dir, **job.extra)
    process = Peer(framework, config, work_dir)
    outputs: list[tuple[bytes, bytes]] = []
    try:
        with cluster.consumer(**{"fetch.wait.max.ms": 50}) as consumer:
            consumer.assign(
                [
                    TopicPartition(topics["output"], p, OFFSET_BEGINNING)
                    for p in range(job.partitions)
                ]
            )
            process.start()
            first_read, done_at, cpu_start = _watch(cluster, process, job, consumer, outputs)
            cpu_end = CpuSnapshot.take([process.pid], cluster.broker_pid)
            result.seconds = done_at - first_read
            result.rate = job.input_records / result.seconds if result.seconds > 0 else 0.0
            result.startup_s = first_read - process.started
            result.peer_cpu_s = cpu_end.peer - cpu_start.peer
            result.broker_cpu_s = cpu_end.broker - cpu_start.broker
            used = result.peer_cpu_s + result.broker_cpu_s + (cpu_end.harness - cpu_start.harness)
            result.other_cpu_s = max(0.0, cpu_end.machine - cpu_start.machine - used)
            result.peak_rss_mib = memory_kib(process.pid).get("VmHWM", 0) / 1024
            if framework in COMMITTING:
                result.committed_rate = _committed_rate(cluster, config["group"], job, first_read)
            settle = time.monotonic() + 1.0
            while time.monotonic() < settle:
                for message in consumer.consume(10_000, timeout=0.1):
                    if message.error() is None:
                        outputs.append((message.key(), message.value()))
        result.state_dir_mib = dir_bytes(state_dir) / 2**20 if state_dir.exists() else 0.0
        result.outputs = len(outputs)
        problem = job.verify(outputs)
        if problem:
            result.error = problem
        else:
            result.verified = True
    except BenchError as exc:
        result.error = str(exc)
    finally:
        process.stop()
        delete_topics(cluster, topics["output"], topics["dlq"])
        shutil.rmtree(work_dir, ignore_errors=True)
    return result


def _watch(
    cluster: Cluster,
    process: Peer,
    job: Job,
    consumer: Any,
    outputs: list[tuple[bytes, bytes]],
) -> tuple[float, float, CpuSnapshot]:
    """Read outputs until ``job.expected_outputs`` are in.

    Returns the peer's first read and the time the last expected output was
    received (epoch seconds), and the CPU snapshot taken at the first read.
    """
    deadline = time.monotonic() + 90 + job.input_records / 2000
    last_progress = time.monotonic()
    cpu_start: CpuSnapshot | None = None
    first_read: float | None = None
    counts, expected = job.counts, job.expected_outputs
    counted = 0
    while True:
        messages = consumer.consume(10_000, timeout=0.05)
        received = time.time()
        if messages:
            last_progress = time.monotonic()
        for message in messages:
            if message.error() is None:
                value = message.value()
                outputs.append((message.key(), value))
                if counts(value):
                    counted += 1
        if first_read is None:
            first_read = process.first_read()
            if first_read is not None:
                cpu_start = CpuSnapshot.take([process.pid], cluster.broker_pid)
                last_progress = time.monotonic()
        if counted >= expected and first_read is not None and cpu_start is not None:
            return first_read, received, cpu_start
        process.check_alive()
        now = time.monotonic()
        if (
            (first_read is None and time.time() - process.started > STARTUP_TIMEOUT_S)
            or (first_read is not None and now - last_progress > STALL_TIMEOUT_S)
            or now > deadline
        ):
            raise BenchError(
                f"{process.name}: {counted} of {expected} results after "
                f"{time.time() - process.started:.0f} s\n{process.log_tail()}"
            )


def _committed_rate(cluster: Cluster, group: str, job: Job, first_read: float) -> float | None:
    """Records/s until the group has committed every input offset; None if not within 10 s."""
    tps = [TopicPartition(job.input_topic, p) for p in range(job.partitions)]
    records = job.input_records
    deadline = time.monotonic() + 10
    with cluster.consumer(group) as offsets:
        while time.monotonic() < deadline:
            found = offsets.committed(tps, timeout=5)
            if sum(tp.offset for tp in found if tp.offset >= 0) >= records:
                return records / (time.time() - first_read)
            time.sleep(0.05)
    return None


# -- verification ------------------------------------------------------------------


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def window_verifier(
    expected: dict[tuple[str, int], tuple[int, int]], closing_ms: int
) -> Callable[[list[tuple[bytes, bytes]]], str | None]:
    """Every expected (key, window) exactly once with its count and sum; nothing else."""

    def verify(outputs: list[tuple[bytes, bytes]]) -> str | None:
        found: dict[tuple[str, int], tuple[int, int]] = {}
        duplicates = 0
        problems: list[str] = []
        for key, value in outputs:
            result = msgspec.json.decode(value)
            start = result.get("start_ms", result.get("start"))
            if start == closing_ms:
                continue  # a closing record's own window (only a wall-clock advance closes it)
            name = result.get("key") or _text(key)
            if name != _text(key):
                problems.append(f"result for {name!r} keyed {key!r}")
            slot = (name, start)
            if slot in found:
                duplicates += 1
            found[slot] = (result["count"], result["sum"])
        missing = expected.keys() - found.keys()
        extra = found.keys() - expected.keys()
        wrong = [k for k in expected.keys() & found.keys() if expected[k] != found[k]]
        if duplicates:
            problems.append(f"{duplicates} (key, window) results emitted more than once")
        if missing:
            problems.append(
                f"{len(missing)} of {len(expected)} windows missing, e.g. {min(missing)}"
            )
        if extra:
            problems.append(f"{len(extra)} unexpected windows, e.g. {min(extra)}")
        if wrong:
            key = min(wrong)
            problems.append(
                f"{len(wrong)} windows with a wrong (count, sum), e.g. {key}: "
                f"{found[key]} instead of {expected[key]}"
            )
        return "; ".join(problems) or None

    return verify


def ids_verifier(
    expected: set[str] | None, total: int
) -> Callable[[list[tuple[bytes, bytes]]], str | None]:
    """Dedup: every unique id exactly once. Passthrough (``expected`` None): ``total`` records."""

    def verify(outputs: list[tuple[bytes, bytes]]) -> str | None:
        if expected is None:
            return None if len(outputs) == total else f"{len(outputs)} records out of {total}"
        seen = [_text(key) for key, _ in outputs]
        unique = set(seen)
        problems = []
        if len(seen) != len(unique):
            problems.append(f"{len(seen) - len(unique)} duplicates passed")
        if unique != expected:
            problems.append(
                f"{len(expected - unique)} ids missing, {len(unique - expected)} unexpected"
            )
        return "; ".join(problems) or None

    return verify


# -- the parts ---------------------------------------------------------------------


def _quiet(args: argparse.Namespace) -> None:
    if args.quiet_wait > 0:
        busy = wait_for_quiet(args.quiet_wait)
        if busy > 0.25:
            _log(f"    (the machine is busy with other work: {busy:.2f} cores; measuring anyway)")


def _report_run(run: Run) -> None:
    if run.ok:
        committed = f", {_fmt(run.committed_rate)} to all committed" if run.committed_rate else ""
        _log(
            f"    {_fmt(run.rate)} records/s{committed} (start-up {run.startup_s:.1f} s, "
            f"{run.outputs:,} outputs, verified)"
        )
    else:
        _log(f"    FAILED: {run.error}")


def run_windows(cluster: Cluster, args: argparse.Namespace, work: Path) -> dict[str, list[Run]]:
    end_ms = (int(time.time()) - 3600) * 1000
    spec = WindowInput(args.records, args.keys, int(args.span_s * 1000), args.window_ms, end_ms)
    _log(
        f"[windows] computing the expected results of {spec.records:,} records "
        f"over {spec.keys:,} keys ..."
    )
    expected = spec.expected()
    verify = window_verifier(expected, spec.closing_ms)
    marker = str(spec.closing_ms).encode()

    def counts(value: bytes) -> bool:
        return marker not in value

    results: dict[str, list[Run]] = {peer: [] for peer in args.peers}
    for index in range(args.runs):
        topic = f"in-windows-{uuid.uuid4().hex[:8]}"
        create_topics(cluster, args.partitions, topic)
        _log(f"[windows run {index + 1}/{args.runs}] producing {spec.total:,} records ...")
        produce_rows(cluster, topic, spec.rows())
        job = Job(
            topic,
            args.partitions,
            spec.total,
            len(expected),
            counts,
            verify,
            {"window_ms": spec.window_ms},
        )
        try:
            for peer in args.peers:
                _quiet(args)
                _log(f"[windows run {index + 1}/{args.runs}] {LABELS[peer]} ...")
                run = timed_run(cluster, peer, job, work)
                _report_run(run)
                results[peer].append(run)
        finally:
            delete_topics(cluster, topic)
    args.window_spec = spec
    args.window_results = len(expected)
    return results


def run_dedup(cluster: Cluster, args: argparse.Namespace, work: Path) -> dict[str, list[Run]]:
    spec = DedupInput(args.dedup_records, args.dup_fraction)
    unique = spec.unique()
    args.dedup_unique = len(unique)
    results: dict[str, list[Run]] = {peer: [] for peer in args.dedup_peers}
    for index in range(args.runs):
        topic = f"in-dedup-{uuid.uuid4().hex[:8]}"
        create_topics(cluster, args.partitions, topic)
        _log(f"[dedup run {index + 1}/{args.runs}] producing {spec.records:,} records ...")
        produce_rows(cluster, topic, spec.rows())
        try:
            for peer in args.dedup_peers:
                _quiet(args)
                _log(f"[dedup run {index + 1}/{args.runs}] {DEDUP_LABELS[peer]} ...")
                stateless = split_peer(peer)[1] == "passthrough"
                job = Job(
                    topic,
                    args.partitions,
                    spec.records,
                    spec.records if stateless else len(unique),
                    lambda _value: True,
                    ids_verifier(None if stateless else unique, spec.records),
                )
                run = timed_run(cluster, peer, job, work)
                _report_run(run)
                results[peer].append(run)
        finally:
            delete_topics(cluster, topic)
    return results


@dataclass
class Memory:
    peer: str
    keys: int
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    anon_before_mib: float = 0.0
    anon_after_mib: float = 0.0
    state_dir_mib: float = 0.0
    consumed_by: str = ""
    """How the harness knew every record was taken in: outputs, commits or an idle peer."""
    error: str | None = None
    samples: list[tuple[float, float]] = field(default_factory=list)

    @property
    def bytes_per_key(self) -> float:
        return (self.rss_after_mib - self.rss_before_mib) * 2**20 / self.keys

    @property
    def anon_bytes_per_key(self) -> float:
        return (self.anon_after_mib - self.anon_before_mib) * 2**20 / self.keys


def measure_memory(
    cluster: Cluster, peer: str, *, keys: int, warmup: int, partitions: int, work_root: Path
) -> Memory:
    """RSS before and after ``peer`` takes on ``keys`` new keys (after ``warmup`` keys)."""
    framework, flow, _ = split_peer(peer)
    result = Memory(peer, keys)
    tag = f"mem-{peer}-{uuid.uuid4().hex[:8]}"
    topics = {"input": f"in-{tag}", "output": f"out-{tag}", "dlq": f"dlq-{tag}"}
    create_topics(cluster, partitions, *topics.values())
    work_dir = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=work_root))
    state_dir = work_dir / "state"
    # One open 1-hour window per key: every record in the same hour, far from its end.
    hour_ms = 3_600_000
    ts_ms = (int(time.time() * 1000) // hour_ms - 2) * hour_ms + 60_000
    _, config = peer_config(cluster, peer, topics, partitions, state_dir, window_ms=hour_ms)
    process = Peer(framework, config, work_dir)
    try:
        with Intake(cluster, process, topics, partitions, emits=flow != "window") as intake:
            produce_rows(cluster, topics["input"], memory_rows(flow, warmup, "w", ts_ms))
            process.start()
            intake.wait(warmup)
            time.sleep(2.0)
            before = memory_kib(process.pid)
            produce_rows(cluster, topics["input"], memory_rows(flow, keys, "m", ts_ms))
            result.consumed_by = intake.wait(warmup + keys)
            time.sleep(2.0)
            after = memory_kib(process.pid)
        result.rss_before_mib = before.get("VmRSS", 0) / 1024
        result.rss_after_mib = after.get("VmRSS", 0) / 1024
        result.anon_before_mib = before.get("RssAnon", 0) / 1024
        result.anon_after_mib = after.get("RssAnon", 0) / 1024
        result.state_dir_mib = dir_bytes(state_dir) / 2**20 if state_dir.exists() else 0.0
    except BenchError as exc:
        result.error = str(exc)
    finally:
        process.stop()
        delete_topics(cluster, *topics.values())
        shutil.rmtree(work_dir, ignore_errors=True)
    return result


class Intake:
    """Tells when a peer has taken in N records: by its outputs, its commits, or idleness.

    Flows that emit one output per input are done when the outputs are all
    out. A window flow holding its windows emits nothing: then the group's
    committed offsets (Loom, Quix) or, failing that, the peer's CPU staying
    under 5% of a core for 3 s after its first read says it has read
    everything.
    """

    def __init__(
        self,
        cluster: Cluster,
        process: Peer,
        topics: dict[str, str],
        partitions: int,
        *,
        emits: bool,
    ) -> None:
        self.process = process
        self.emits = emits
        self.seen = 0
        self._stack = contextlib.ExitStack()
        self.outputs = self._stack.enter_context(cluster.consumer(**{"fetch.wait.max.ms": 50}))
        self.outputs.assign(
            [TopicPartition(topics["output"], p, OFFSET_BEGINNING) for p in range(partitions)]
        )
        self.offsets = self._stack.enter_context(cluster.consumer(process.config["group"]))
        self.inputs = [TopicPartition(topics["input"], p) for p in range(partitions)]

    def __enter__(self) -> Intake:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def wait(self, records: int) -> str:
        deadline = time.monotonic() + 120 + records / 2000
        idle_since: float | None = None
        last = (time.monotonic(), process_cpu_s(self.process.pid))
        while True:
            self.process.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.process.name} did not take in {records} records in time\n"
                    f"{self.process.log_tail()}"
                )
            if self.emits:
                messages = self.outputs.consume(10_000, timeout=0.05)
                self.seen += sum(1 for m in messages if m.error() is None)
                if self.seen >= records:
                    return "outputs"
                continue
            time.sleep(0.5)
            if self.process.name in COMMITTING:
                found = self.offsets.committed(self.inputs, timeout=5)
                if sum(tp.offset for tp in found if tp.offset >= 0) >= records:
                    return "commits"
            now, cpu = time.monotonic(), process_cpu_s(self.process.pid)
            busy = (cpu - last[1]) / max(1e-3, now - last[0])
            last = (now, cpu)
            if self.process.first_read() is not None and busy < 0.05:
                idle_since = idle_since or now
                if now - idle_since >= 3.0:
                    return "idle"
            else:
                idle_since = None


# -- the report ---------------------------------------------------------------------


def _median(runs: list[Run], attribute: str = "rate") -> float | None:
    values = [getattr(r, attribute) for r in runs if r.ok and getattr(r, attribute) is not None]
    return statistics.median(values) if values else None


def print_windows(args: argparse.Namespace, results: dict[str, list[Run]]) -> list[str]:
    spec: WindowInput = args.window_spec
    misses: list[str] = []
    print()
    print(
        f"windows: per-key count + sum in {spec.window_ms:,} ms tumbling event-time windows; "
        f"{spec.records:,} records over {spec.keys:,} keys spanning {spec.span_ms / 1000:g} s "
        f"of event time, + {spec.keys:,} closing records (one per key, 10 s later); "
        f"{args.window_results:,} (key, window) results; {args.partitions} partitions; "
        f"median of {args.runs}"
    )
    print(
        "records/s: input records (closing ones included) from the peer's first record "
        "decoded to the harness receiving the last expected result"
    )
    header = (
        f"{'peer':<40} {'median':>9}  {'runs':<26} {'start-up':>8} {'us CPU/rec':>10}"
        f" {'peak RSS':>9}  {'Loom/peer':>9}  results"
    )
    print(header)
    print("-" * len(header))
    loom = _median(results.get("loom", []))
    for peer, runs in results.items():
        median = _median(runs)
        rates = " ".join(_fmt(r.rate) if r.ok else "FAILED" for r in runs)
        ok = [r for r in runs if r.ok]
        startup = f"{statistics.median(r.startup_s for r in ok):.1f} s" if ok else "-"
        cpu = f"{statistics.median(r.cpu_us_per_record for r in ok):.1f}" if ok else "-"
        rss = f"{statistics.median(r.peak_rss_mib for r in ok):.0f} MiB" if ok else "-"
        ratio = f"{loom / median:.2f}x" if loom and median else "-"
        verdict = (
            "all correct"
            if all(r.ok for r in runs)
            else "; ".join(sorted({r.error or "" for r in runs if not r.ok}))[:200]
        )
        print(
            f"{LABELS[peer]:<40} {_fmt(median):>9}  {rates:<26} {startup:>8} {cpu:>10}"
            f" {rss:>9}  {ratio:>9}  {verdict}"
        )
    print()
    print("targets (issue 15, item 8), on the records/s medians above")
    for peer, target in WINDOW_TARGETS.items():
        median = _median(results.get(peer, []))
        if peer not in results:
            continue
        if loom is None or median is None:
            print(f"  Loom >= {target:g}x {LABELS[peer]:<40}     -  NOT MEASURED")
            misses.append(peer)
            continue
        achieved = loom / median
        verdict = "PASS" if achieved >= target else "MISS"
        if verdict == "MISS":
            misses.append(peer)
        print(f"  Loom >= {target:g}x {LABELS[peer]:<40} {achieved:5.2f}x  {verdict}")
    return misses


def print_dedup(args: argparse.Namespace, results: dict[str, list[Run]]) -> list[str]:
    print()
    print(
        f"dedup: {args.dedup_records:,} records keyed by id, {args.dup_fraction:.0%} repeating "
        f"an earlier id ({args.dedup_unique:,} unique); {args.partitions} partitions; "
        f"median of {args.runs}"
    )
    print("records/s: input records from the first record decoded to the last output received")
    header = (
        f"{'flow':<44} {'median':>9}  {'runs':<26} {'committed':>9} {'us CPU/rec':>10}"
        f" {'peak RSS':>9}  {'/stateless':>10}"
    )
    print(header)
    print("-" * len(header))
    base = _median(results.get("loom-passthrough", []))
    for peer, runs in results.items():
        median = _median(runs)
        rates = " ".join(_fmt(r.rate) if r.ok else "FAILED" for r in runs)
        ok = [r for r in runs if r.ok]
        committed = _fmt(_median(runs, "committed_rate"))
        cpu = f"{statistics.median(r.cpu_us_per_record for r in ok):.1f}" if ok else "-"
        rss = f"{statistics.median(r.peak_rss_mib for r in ok):.0f} MiB" if ok else "-"
        ratio = f"{median / base:.2f}x" if base and median else "-"
        print(
            f"{DEDUP_LABELS[peer]:<44} {_fmt(median):>9}  {rates:<26} {committed:>9} {cpu:>10}"
            f" {rss:>9}  {ratio:>10}"
        )
        for run in runs:
            if not run.ok:
                print(f"    FAILED: {(run.error or '')[:300]}")
    dedup = _median(results.get("loom-dedup", []))
    if base is None or "loom-dedup" not in results:
        return []
    print()
    if dedup is None:
        print(f"  Loom dedup >= {DEDUP_TARGET:g}x stateless      -  NOT MEASURED")
        return ["dedup"]
    achieved = dedup / base
    verdict = "PASS" if achieved >= DEDUP_TARGET else "MISS"
    print(
        f"  Loom StatefulStep dedup >= {DEDUP_TARGET:g}x the stateless flow"
        f"  {achieved:.2f}x  {verdict}"
    )
    return [] if verdict == "PASS" else ["dedup"]


def print_memory(args: argparse.Namespace, rows: list[Memory]) -> None:
    print()
    print(
        f"memory: RSS growth while a peer takes on {args.memory_keys:,} new keys "
        f"(after {args.memory_warmup:,} warm-up keys), divided by the keys"
    )
    header = (
        f"{'peer':<52} {'RSS before':>10} {'after':>9} {'bytes/key':>9} {'anon B/key':>10}"
        f" {'state dir':>9}  done by"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if row.error:
            print(f"{MEMORY_LABELS[row.peer]:<52} FAILED: {row.error[:200]}")
            continue
        print(
            f"{MEMORY_LABELS[row.peer]:<52} {row.rss_before_mib:>7.0f} MiB"
            f" {row.rss_after_mib:>5.0f} MiB"
            f" {row.bytes_per_key:>9.0f} {row.anon_bytes_per_key:>10.0f}"
            f" {row.state_dir_mib:>5.0f} MiB  {row.consumed_by}"
        )


# -- main ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="windows,dedup,memory")
    parser.add_argument("--records", type=int, default=1_000_000, help="window records per run")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--span-s", type=float, default=100.0, help="event time the records span")
    parser.add_argument("--window-ms", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--peers", default="loom,bytewax,quix", help="window peers")
    parser.add_argument(
        "--loom-volatile", action="store_true", help="also Loom with volatile state"
    )
    parser.add_argument("--dedup-records", type=int, help="default: --records")
    parser.add_argument("--dup-fraction", type=float, default=0.05)
    parser.add_argument(
        "--dedup-peers",
        default="loom-passthrough,loom-dedup",
        help="also: bytewax-dedup,quix-dedup",
    )
    parser.add_argument("--memory-keys", type=int, default=1_000_000)
    parser.add_argument("--memory-warmup", type=int, default=20_000)
    parser.add_argument(
        "--memory-peers",
        default="loom-passthrough,loom-dedup,loom-window,bytewax-dedup,bytewax-window,quix-dedup",
    )
    parser.add_argument("--quiet-wait", type=float, default=20.0)
    parser.add_argument("--json", type=Path, help="write every measurement here as JSON")
    parser.add_argument("--keep-logs", type=Path, help="keep the peers' work dirs here")
    args = parser.parse_args(argv)
    split = lambda text: [p.strip() for p in text.split(",") if p.strip()]  # noqa: E731
    args.parts = split(args.parts)
    args.peers = split(args.peers)
    args.dedup_peers = split(args.dedup_peers)
    args.memory_peers = split(args.memory_peers)
    if args.loom_volatile:
        args.peers.append("loom-volatile")
        if "loom-dedup" in args.dedup_peers:
            args.dedup_peers.append("loom-dedup-volatile")
        for name in ("loom-dedup", "loom-window"):
            if name in args.memory_peers:
                args.memory_peers.append(f"{name}-volatile")
    args.dedup_records = args.dedup_records or args.records
    for names, known in (
        (args.peers, LABELS),
        (args.dedup_peers, DEDUP_LABELS),
        (args.memory_peers, MEMORY_LABELS),
    ):
        unknown = sorted(set(names) - set(known))
        if unknown:
            parser.error(f"unknown peers: {', '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine()
    began = time.monotonic()
    windows: dict[str, list[Run]] = {}
    dedup: dict[str, list[Run]] = {}
    memory: list[Memory] = []
    with log_directory(args.keep_logs) as work, DevBroker() as broker:
        cluster = Cluster(broker.bootstrap_servers, broker.pid)
        if "windows" in args.parts:
            windows = run_windows(cluster, args, work)
        if "dedup" in args.parts:
            dedup = run_dedup(cluster, args, work)
        if "memory" in args.parts:
            for peer in args.memory_peers:
                _quiet(args)
                _log(f"[memory] {MEMORY_LABELS[peer]}: {args.memory_keys:,} keys ...")
                row = measure_memory(
                    cluster,
                    peer,
                    keys=args.memory_keys,
                    warmup=args.memory_warmup,
                    partitions=args.partitions,
                    work_root=work,
                )
                _log(
                    f"    FAILED: {row.error}"
                    if row.error
                    else f"    {row.bytes_per_key:,.0f} bytes/key (RSS {row.rss_before_mib:.0f}"
                    f" -> {row.rss_after_mib:.0f} MiB, by {row.consumed_by})"
                )
                memory.append(row)
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    print()
    print(
        f"Loom stateful benchmark: one Tansu broker on loopback; machine: {info['cpus']} CPUs "
        f"({info['cpu_model']}), Python {info['python']}"
    )
    load = ", ".join(f"{value:.2f}" for value in info["load_average_at_start"])
    print(f"load average before the benchmark: {load}")
    print(f"versions: {versions}")
    print(f"loom imported from {Path(loom.__file__).parent} (set PYTHONPATH to pin a copy)")
    misses: list[str] = []
    if windows:
        misses += print_windows(args, windows)
    if dedup:
        misses += print_dedup(args, dedup)
    if memory:
        print_memory(args, memory)
    print(f"\n(total {time.monotonic() - began:.0f} s)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "command": " ".join(sys.argv),
            "machine": info,
            "windows": {
                "input": asdict(args.window_spec) if windows else None,
                "results": getattr(args, "window_results", None),
                "peers": {
                    peer: {
                        "median": _median(runs),
                        "runs": [{**asdict(r), "ok": r.ok} for r in runs],
                    }
                    for peer, runs in windows.items()
                },
            },
            "dedup": {
                peer: {"median": _median(runs), "runs": [{**asdict(r), "ok": r.ok} for r in runs]}
                for peer, runs in dedup.items()
            },
            "memory": [
                {**asdict(row), "bytes_per_key": row.bytes_per_key if not row.error else None}
                for row in memory
            ],
            "misses": misses,
        }
        args.json.write_text(json.dumps(document, indent=2))
    failed = [r for runs in (*windows.values(), *dedup.values()) for r in runs if not r.ok]
    return 1 if failed or any(row.error for row in memory) else 0


if __name__ == "__main__":
    sys.exit(main())
