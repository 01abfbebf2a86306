"""Measuring peers against one broker: topics, input, output watching, peer processes.

Everything here runs in the harness process. The peers run in their own
subprocesses (``peers.py``) so each gets a fresh interpreter and its own
memory; the harness only produces the input before a run, then watches the
output topic and the committed offsets, polling with deadlines.

Tansu's high watermark is wrong for batched produce, so the harness counts
output records by reading them instead of trusting watermarks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from work import order_bytes, record_id

BENCH_DIR = Path(__file__).resolve().parent
PEERS_SCRIPT = BENCH_DIR / "peers.py"

COMMITTING_PEERS = frozenset({"loom", "quix", "plain"})
"""Peers that commit input offsets; a run of these ends only once all are committed."""

STARTUP_TIMEOUT_S = 90.0
"""How long a peer may take from process start to its first output record."""

_QUIET = {"log_level": 0}
"""librdkafka client logs off for the harness's own clients."""


class BenchError(RuntimeError):
    """A benchmark run failed; the message says which and why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.02
) -> None:
    """Poll ``predicate`` until true; raise :class:`BenchError` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


# -- CPU accounting ------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int, *, main_thread_only: bool = False) -> float:
    """User + system CPU seconds of a live process (all its threads); 0 if gone.

    ``main_thread_only`` counts the main thread alone: the one running the
    Python work of a single-worker peer (librdkafka's threads are the rest).
    """
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread_only else f"/proc/{pid}/stat"
    try:
        text = Path(path).read_text()
    except OSError:
        return 0.0
    fields = text.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle since boot (all cores)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _TICK


def wait_for_quiet(max_wait_s: float, *, threshold_cores: float = 0.25) -> float:
    """Wait (polling, at most ``max_wait_s``) until the machine is nearly idle.

    Returns the busy cores of the last one-second sample: other work on the
    machine (tests, builds) otherwise lands in the middle of a measurement.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        before, began = machine_busy_s(), time.monotonic()
        time.sleep(min(1.0, max(0.0, deadline - began)) or 0.2)
        busy = (machine_busy_s() - before) / (time.monotonic() - began)
        if busy <= threshold_cores or time.monotonic() >= deadline:
            return busy


@dataclass
class CpuSnapshot:
    """CPU seconds used so far by the peer processes, the broker, the harness, the machine."""

    peer: float
    peer_main: float
    broker: float
    harness: float
    machine: float

    @classmethod
    def take(cls, peer_pids: Sequence[int], broker_pid: int | None) -> CpuSnapshot:
        times = os.times()
        return cls(
            sum(process_cpu_s(pid) for pid in peer_pids),
            sum(process_cpu_s(pid, main_thread_only=True) for pid in peer_pids),
            process_cpu_s(broker_pid) if broker_pid else 0.0,
            times.user + times.system,
            machine_busy_s(),
        )


# -- topics and input ---------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    input: str
    output: str
    dlq: str
    partitions: int


PEER_LABELS = {
    "loom": "Loom StreamFlow (at-least-once)",
    "bytewax": "Bytewax KafkaSource->map->KafkaSink",
    "quix": "Quix Streams (at-least-once)",
    "plain": "plain confluent-kafka loop",
}
"""The peers ``peers.py`` runs, as every benchmark names them."""


class Cluster:
    """The broker as seen by the harness."""

    def __init__(self, bootstrap: str, broker_pid: int | None = None) -> None:
        self.bootstrap = bootstrap
        self.broker_pid = broker_pid
        self.admin = AdminClient({"bootstrap.servers": bootstrap, **_QUIET})

    def fresh_topics(self, label: str, partitions: int) -> Topics:
        tag = f"{label}-{uuid.uuid4().hex[:8]}"
        topics = Topics(f"in-{tag}", f"out-{tag}", f"dlq-{tag}", partitions)
        futures = self.admin.create_topics(
            [
                NewTopic(topics.input, partitions),
                NewTopic(topics.output, partitions),
                NewTopic(topics.dlq, 1),
            ],
            request_timeout=15,
        )
        for future in futures.values():
            future.result(timeout=15)
        wait_for(
            lambda: all(
                name in self.admin.list_topics(timeout=5).topics
                for name in (topics.input, topics.output, topics.dlq)
            ),
            15,
            "the new topics to appear in metadata",
        )
        return topics

    def delete_topics(self, topics: Topics) -> None:
        """Drop a run's topics so the in-memory broker does not grow run after run."""
        futures = self.admin.delete_topics(
            [topics.input, topics.output, topics.dlq], request_timeout=15
        )
        for future in futures.values():
            with contextlib.suppress(Exception):
                future.result(timeout=15)

    def producer(self, **extra: Any) -> Producer:
        return Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5, **_QUIET, **extra})

    def produce_inputs(self, topic: str, count: int, *, start: int = 0) -> float:
        """Produce ``count`` records keyed by their id; returns the seconds it took."""
        producer = self.producer()
        began = time.monotonic()
        produce, poll = producer.produce, producer.poll
        for index in range(start, start + count):
            key = record_id(index).encode()
            value = order_bytes(index)
            while True:
                try:
                    produce(topic, value, key)
                    break
                except BufferError:
                    poll(0.05)
        remaining = producer.flush(60)
        if remaining:
            raise BenchError(f"{remaining} input records were not delivered to {topic}")
        return time.monotonic() - began

    def committed_total(self, group: str, topic: str, partitions: int) -> int:
        with self.consumer(group) as consumer:
            found = consumer.committed(
                [TopicPartition(topic, p) for p in range(partitions)], timeout=5
            )
        return sum(tp.offset for tp in found if tp.offset >= 0)

    @contextlib.contextmanager
    def consumer(self, group: str | None = None, **extra: Any) -> Iterator[Consumer]:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": group or f"harness-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 50,
                "fetch.queue.backoff.ms": 10,  # see peers.COMMON_CONSUMER
                **_QUIET,
                **extra,
            }
        )
        try:
            yield consumer
        finally:
            consumer.close()


class OutputWatch:
    """Reads an output topic from the beginning, counting records as they arrive."""

    def __init__(self, cluster: Cluster, topics: Topics, *, keep_ids: bool = False) -> None:
        self._stack = contextlib.ExitStack()
        # Tansu holds every fetch for the full fetch.wait.max.ms even when data is
        # there, so a latency watch asks for short waits.
        fetch: dict[str, Any] = {"fetch.wait.max.ms": 5 if keep_ids else 50}
        self.consumer = self._stack.enter_context(cluster.consumer(**fetch))
        self.consumer.assign(
            [TopicPartition(topics.output, p, OFFSET_BEGINNING) for p in range(topics.partitions)]
        )
        self.count = 0
        self.first_seen: float | None = None
        self.keep_ids = keep_ids
        self.seen: list[tuple[int, int, float]] = []
        """(record index, output record timestamp ms, harness receive time s) when keep_ids."""

    def poll(self, timeout_s: float) -> int:
        """Read what arrived within ``timeout_s``; returns how many records."""
        messages = self.consumer.consume(10_000, timeout=timeout_s)
        now = time.time()
        good = [m for m in messages if m.error() is None]
        if good and self.first_seen is None:
            self.first_seen = time.monotonic()
        self.count += len(good)
        if self.keep_ids:
            # Every peer keys its output by the input's key, the record id
            # ("o000000042"): reading the index from the key keeps the
            # harness's own CPU per record small while the peer is measured.
            for message in good:
                key = message.key()
                if key is not None:
                    self.seen.append((int(key[1:]), message.timestamp()[1], now))
        return len(good)

    def close(self) -> None:
        self._stack.close()


# -- peer processes -----------------------------------------------------------


@dataclass
class PeerProcess:
    """One peer subprocess, its log captured to a file."""

    name: str
    config: dict[str, Any]
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the peer alone (an allocator to try, say), not for the broker."""
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    started: float = 0.0

    def start(self) -> PeerProcess:
        suffix = f"-p{self.config.get('process_id') or 0}"
        self.log_path = self.log_dir / f"{self.name}{suffix}-{uuid.uuid4().hex[:6]}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("wb") as log:
            self.started = time.monotonic()
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    str(PEERS_SCRIPT),
                    self.name,
                    json.dumps(self.config),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=BENCH_DIR,
            )
        return self

    def check_alive(self) -> None:
        assert self.process is not None
        code = self.process.poll()
        if code is not None:
            raise BenchError(f"peer {self.name} exited early with code {code}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (a graceful stop for Loom and Quix), then SIGKILL after ``timeout_s``."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# -- measurements -------------------------------------------------------------


@dataclass
class RunResult:
    peer: str
    label: str
    records: int
    rate: float = 0.0
    """Records per second from the first output record to all records out (and committed)."""
    seconds: float = 0.0
    out_rate: float = 0.0
    """Records per second from the first to the last output record (no commit wait)."""
    startup_s: float = 0.0
    """Peer process start to its first output record."""
    output_records: int = 0
    committed: int | None = None
    peer_cpu_s: float = 0.0
    """CPU seconds the peer's processes used during the timed part of the run."""
    peer_main_cpu_s: float = 0.0
    """The same, main threads only (a single-worker peer's Python work)."""
    broker_cpu_s: float = 0.0
    harness_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    """CPU seconds used by anything else on the machine meanwhile (noise)."""
    error: str | None = None

    def set_cpu(self, start: CpuSnapshot, end: CpuSnapshot) -> None:
        self.peer_cpu_s = end.peer - start.peer
        self.peer_main_cpu_s = end.peer_main - start.peer_main
        self.broker_cpu_s = end.broker - start.broker
        self.harness_cpu_s = end.harness - start.harness
        used = self.peer_cpu_s + self.broker_cpu_s + self.harness_cpu_s
        self.other_cpu_s = max(0.0, end.machine - start.machine - used)

    @property
    def cpu_us_per_record(self) -> float:
        return 1e6 * self.peer_cpu_s / self.records if self.records else 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class PeerSpec:
    """What to run: a peer, with how many processes and workers per process."""

    peer: str
    label: str
    workers: int = 1
    processes: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def configs(self, cluster: Cluster, topics: Topics, group: str) -> list[dict[str, Any]]:
        addresses = (
            [f"127.0.0.1:{free_port()}" for _ in range(self.processes)]
            if self.processes > 1
            else None
        )
        return [
            {
                "bootstrap": cluster.bootstrap,
                "input": topics.input,
                "output": topics.output,
                "dlq": topics.dlq,
                "partitions": topics.partitions,
                "group": group,
                "workers": self.workers,
                "processes": self.processes,
                "process_id": process_id if addresses else None,
                "addresses": addresses,
                **self.extra,
            }
            for process_id in range(self.processes)
        ]


def run_timeout(records: int) -> float:
    """A generous bound for one run: start-up plus a very slow 2,000 records/s."""
    return 60.0 + records / 2000.0


def measure(
    cluster: Cluster,
    spec: PeerSpec,
    records: int,
    partitions: int,
    log_dir: Path,
    *,
    stall_timeout_s: float = 30.0,
) -> RunResult:
    """One throughput run: fresh topics, ``records`` inputs, the peer until all done.

    The clock runs from the first output record the harness sees to the moment
    every record is in the output topic and, for peers that commit, every input
    offset is committed. Start-up (process start to first output) is reported
    separately, so a consumer-group join or an import does not count as
    processing time.
    """
    result = RunResult(spec.peer, spec.label, records)
    topics = cluster.fresh_topics(spec.peer, partitions)
    group = f"bench-{spec.peer}-{uuid.uuid4().hex[:8]}"
    cluster.produce_inputs(topics.input, records)
    watch = OutputWatch(cluster, topics)
    processes = [
        PeerProcess(spec.peer, config, log_dir) for config in spec.configs(cluster, topics, group)
    ]
    try:
        for process in processes:
            process.start()
        started = processes[0].started
        deadline = time.monotonic() + run_timeout(records)
        last_progress = time.monotonic()
        pids = [p.process.pid for p in processes if p.process is not None]
        cpu_start: CpuSnapshot | None = None
        while watch.count < records:
            if watch.poll(0.05):
                last_progress = time.monotonic()
                if cpu_start is None:
                    cpu_start = CpuSnapshot.take(pids, cluster.broker_pid)
            for process in processes:
                process.check_alive()
            now = time.monotonic()
            stalled = (
                now - started > STARTUP_TIMEOUT_S
                if watch.first_seen is None
                else now - last_progress > stall_timeout_s
            )
            if stalled or now >= deadline:
                raise BenchError(
                    f"{spec.label}: {watch.count} of {records} output records after "
                    f"{now - started:.0f} s\n{processes[0].log_tail()}"
                )
        all_out = time.monotonic()
        if spec.peer in COMMITTING_PEERS:
            with cluster.consumer(group) as offsets:
                tps = [TopicPartition(topics.input, p) for p in range(partitions)]

                def all_committed() -> bool:
                    found = offsets.committed(tps, timeout=5)
                    result.committed = sum(tp.offset for tp in found if tp.offset >= 0)
                    return result.committed >= records

                wait_for(
                    all_committed,
                    max(0.0, deadline - time.monotonic()) + 1,
                    f"{spec.label} to commit {records} offsets",
                )
        done = time.monotonic()
        cpu_end = CpuSnapshot.take(pids, cluster.broker_pid)
        assert watch.first_seen is not None
        assert cpu_start is not None
        result.set_cpu(cpu_start, cpu_end)
        result.output_records = watch.count
        result.seconds = done - watch.first_seen
        result.rate = records / result.seconds if result.seconds > 0 else float("inf")
        out_seconds = all_out - watch.first_seen
        result.out_rate = records / out_seconds if out_seconds > 0 else float("inf")
        result.startup_s = watch.first_seen - started
    except BenchError as exc:
        result.error = str(exc)
    finally:
        for process in processes:
            process.stop()
        watch.close()
        cluster.delete_topics(topics)
    return result


@dataclass
class LatencyResult:
    label: str
    rate: float
    """Target input rate (records/s)."""
    achieved_rate: float
    records: int
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    received_p50_ms: float = 0.0
    received_p99_ms: float = 0.0
    error: str | None = None


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def measure_latency(
    cluster: Cluster,
    spec: PeerSpec,
    *,
    rate: float,
    duration_s: float,
    partitions: int,
    log_dir: Path,
    warmup_fraction: float = 0.1,
) -> LatencyResult:
    """End-to-end latency with input paced at ``rate`` records/s for ``duration_s``.

    Latency is the output record's timestamp (stamped by the peer's producer)
    minus the input record's produce timestamp; the time the harness received
    the output is reported too. The first ``warmup_fraction`` of records is
    left out.
    """
    topics = cluster.fresh_topics(f"{spec.peer}-lat", partitions)
    group = f"bench-lat-{uuid.uuid4().hex[:8]}"
    total = max(1, int(rate * duration_s))
    result = LatencyResult(spec.label, rate, 0.0, total)
    watch = OutputWatch(cluster, topics, keep_ids=True)
    processes = [
        PeerProcess(spec.peer, config, log_dir) for config in spec.configs(cluster, topics, group)
    ]
    producer = cluster.producer()
    sent_ms = [0] * (total + 1)
    try:
        for process in processes:
            process.start()
        # Wait until the peer is up: one probe record (index ``total``) goes through.
        sent_ms[total] = int(time.time() * 1000)
        producer.produce(topics.input, order_bytes(total), record_id(total).encode())
        producer.flush(10)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while watch.count < 1:
            watch.poll(0.05)
            for process in processes:
                process.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{spec.label} processed no probe record in {STARTUP_TIMEOUT_S} s")
        result.achieved_rate = _paced_produce(producer, topics.input, watch, rate, sent_ms)
        drain_deadline = time.monotonic() + 60
        while watch.count < total + 1:
            watch.poll(0.05)
            if time.monotonic() > drain_deadline:
                raise BenchError(f"{spec.label}: only {watch.count - 1} of {total} records out")
        skip = int(total * warmup_fraction)
        stamped = [(i, ts, got) for i, ts, got in watch.seen if skip <= i < total]
        latencies = [float(ts - sent_ms[i]) for i, ts, _ in stamped]
        received = [got * 1000 - sent_ms[i] for i, _, got in stamped]
        result.p50_ms = _percentile(latencies, 0.50)
        result.p99_ms = _percentile(latencies, 0.99)
        result.max_ms = max(latencies) if latencies else float("nan")
        result.received_p50_ms = _percentile(received, 0.50)
        result.received_p99_ms = _percentile(received, 0.99)
    except BenchError as exc:
        result.error = str(exc)
    finally:
        producer.flush(5)
        for process in processes:
            process.stop()
        watch.close()
        cluster.delete_topics(topics)
    return result


def _paced_produce(
    producer: Producer, topic: str, watch: OutputWatch, rate: float, sent_ms: list[int]
) -> float:
    """Produce records ``0 .. len(sent_ms) - 2`` at ``rate``, reading output meanwhile.

    Returns the rate achieved. ``sent_ms[i]`` gets record ``i``'s timestamp.
    """
    total = len(sent_ms) - 1
    # Encoded before the clock starts, so pacing costs the harness little CPU
    # on a machine it shares with the peer and the broker.
    payloads = [(order_bytes(i), record_id(i).encode()) for i in range(total)]
    began = time.monotonic()
    sent = 0
    tick = 0.005
    while sent < total:
        elapsed = time.monotonic() - began
        due = min(total, int(rate * elapsed) + 1)
        while sent < due:
            now_ms = int(time.time() * 1000)
            value, key = payloads[sent]
            try:
                producer.produce(topic, value, key, timestamp=now_ms)
            except BufferError:
                producer.poll(0.01)
                continue
            sent_ms[sent] = now_ms
            sent += 1
        producer.poll(0)
        next_tick = began + (int(elapsed / tick) + 1) * tick
        watch.poll(max(0.0, next_tick - time.monotonic()))
    achieved = total / (time.monotonic() - began)
    producer.flush(10)
    return achieved


@contextlib.contextmanager
def log_directory(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="loom-bench-") as tmp:
        yield Path(tmp)
