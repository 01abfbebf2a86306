"""Run a flow on the real Bytewax runtime with in-memory topics instead of Kafka.

Only the transport is swapped: the flow is compiled, built into a Bytewax
dataflow and executed by ``cli_main`` through ``StreamingRunner.run``, with
the same acks and commits as in production. Inputs are finite, so the run
drains and returns when every record is finished::

    tester = TestRunner(flow)
    tester.send(Order(id="a", amount=3))
    tester.send(b"not json")
    result = tester.run()
    assert result.values("output", EnrichedOrder) == [...]
    assert result.dead_letters("dlq")[0].kind is ErrorKind.WIRE
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from loom.config.context import ConfigContext
from loom.config.delivery import AT_LEAST_ONCE
from loom.delivery.acks import Ack
from loom.delivery.transport import FailureReport, Origin, OutRecord
from loom.errors import MessageTooLarge as MessageTooLarge  # noqa: PLC0414 (re-export)
from loom.observability import ObservabilityRuntime
from loom.streaming.bytewax.runner import BytewaxRuntimeConfig, StreamingRunner
from loom.streaming.codecs import build_codec
from loom.streaming.compiler import logical_topics
from loom.streaming.errors import ErrorEnvelope
from loom.streaming.message import Headers
from loom.streaming.nodes import StreamFlow

T = TypeVar("T")

__all__ = ["ManualClock", "MemoryBroker", "MemoryRecord", "RunResult", "TestRunner"]


@dataclass(frozen=True)
class MemoryRecord:
    """A stored record, readable through the same methods as a Kafka message."""

    topic_name: str
    partition_id: int
    offset_id: int
    key_bytes: bytes | None
    value_bytes: bytes | None
    header_list: Headers = ()
    timestamp_ms: int = 0

    def topic(self) -> str:
        return self.topic_name

    def partition(self) -> int:
        return self.partition_id

    def offset(self) -> int:
        return self.offset_id

    def key(self) -> bytes | None:
        return self.key_bytes

    def value(self) -> bytes | None:
        return self.value_bytes

    def headers(self) -> list[tuple[str, bytes]]:
        return list(self.header_list)

    def timestamp(self) -> tuple[int, int]:
        return (1, self.timestamp_ms)


class MemoryBroker:
    """Partitioned in-memory topics and committed offsets; thread-safe."""

    def __init__(self, partitions: int = 1, *, max_message_bytes: int = 1_048_588) -> None:
        self.partitions = partitions
        self.max_message_bytes = max_message_bytes
        """Larger values are refused for good, as Kafka's ``message.max.bytes``."""
        self._topics: dict[str, list[list[MemoryRecord]]] = {}
        self._committed: dict[str, dict[int, int]] = {}
        self._lock = threading.Lock()

    def _topic(self, topic: str) -> list[list[MemoryRecord]]:
        if topic not in self._topics:
            self._topics[topic] = [[] for _ in range(self.partitions)]
        return self._topics[topic]

    def produce(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
        partition: int | None = None,
        timestamp_ms: int = 0,
    ) -> MemoryRecord:
        """Append a record; without ``partition`` the key (or round robin) chooses."""
        with self._lock:
            parts = self._topic(topic)
            if partition is None:
                total = sum(map(len, parts))
                partition = (zlib.crc32(key) if key is not None else total) % len(parts)
            log = parts[partition]
            record = MemoryRecord(
                topic, partition, len(log), key, value, tuple(headers), timestamp_ms
            )
            log.append(record)
            return record

    def records(self, topic: str) -> list[MemoryRecord]:
        """Every record of ``topic``, partition by partition."""
        with self._lock:
            return [record for part in self._topic(topic) for record in part]

    def partition_records(self, topic: str, partition: int) -> list[MemoryRecord]:
        with self._lock:
            return list(self._topic(topic)[partition])

    def commit(self, topic: str, offsets: Mapping[int, int]) -> None:
        with self._lock:
            self._committed.setdefault(topic, {}).update(offsets)

    def committed(self, topic: str) -> dict[int, int]:
        with self._lock:
            return dict(self._committed.get(topic, {}))


class MemoryReader:
    """Reads the partitions ``p`` with ``p % worker_count == worker_index``.

    The input counts as exhausted once everything is read and ``hold_open``
    (if any) returns False.
    """

    def __init__(
        self,
        broker: MemoryBroker,
        topic: str,
        worker_index: int,
        worker_count: int,
        hold_open: Callable[[], bool] | None = None,
    ):
        self.broker = broker
        self.topic = topic
        self.hold_open = hold_open
        committed = broker.committed(topic)
        self.positions = {
            p: committed.get(p, 0)
            for p in range(broker.partitions)
            if p % worker_count == worker_index
        }
        self.commits: list[dict[int, int]] = []
        self.polled = False
        """The worker's loop has polled at least once (its operators have run)."""

    def poll(self, max_records: int) -> list[Origin]:
        self.polled = True
        batch: list[Origin] = []
        for partition, position in self.positions.items():
            if len(batch) >= max_records:
                break
            log = self.broker.partition_records(self.topic, partition)
            taken = log[position : position + max_records - len(batch)]
            self.positions[partition] = position + len(taken)
            batch += taken
        return batch

    def commit(self, offsets: Mapping[int, int]) -> None:
        self.commits.append(dict(offsets))
        self.broker.commit(self.topic, offsets)

    def end_offsets(self, partitions: Mapping[int, int]) -> dict[int, int]:
        return {p: len(self.broker.partition_records(self.topic, p)) for p in partitions}

    def exhausted(self) -> bool:
        if self.hold_open is not None and self.hold_open():
            return False
        return self.read_all()

    def read_all(self) -> bool:
        return all(self.caught_up(partition) for partition in self.positions)

    def caught_up(self, partition: int) -> bool:
        return self.positions[partition] >= len(
            self.broker.partition_records(self.topic, partition)
        )

    def close(self) -> None:
        return None


class ManualClock:
    """The wall clock of a test run: it moves only when the test says so.

    Records sent without a timestamp get the clock's time; stateful nodes
    read it to move event time on while the input is idle, so a run's
    results never depend on how fast the machine is.
    """

    def __init__(self, now_ms: int = 0) -> None:
        self.now_ms = now_ms

    def __call__(self) -> float:
        return float(self.now_ms)

    def advance(self, ms: int) -> None:
        self.now_ms += ms


class MemoryWriter:
    """Appends to the broker; an append is a delivery, so acks release at once."""

    def __init__(self, broker: MemoryBroker, topic: str, report: FailureReport) -> None:
        self.broker = broker
        self.topic = topic
        self.report = report

    def write(self, records: list[OutRecord], acks: list[Ack]) -> None:
        limit = self.broker.max_message_bytes
        for record, ack in zip(records, acks, strict=True):
            key, value, headers, _source = record
            if len(value) > limit:
                self.report(record, ack, MessageTooLarge(f"{len(value)} bytes > {limit}"))
                continue
            self.broker.produce(self.topic, value, key=key, headers=tuple(headers or ()))
            ack.release()

    def poll(self) -> None:
        return None

    def flush(self, timeout_s: float) -> None:
        return None

    def close(self) -> None:
        return None


class MemoryTransport:
    """The in-memory stand-in for the Kafka transport."""

    def __init__(self, broker: MemoryBroker, hold_open: Callable[[], bool] | None = None) -> None:
        self.broker = broker
        self.hold_open = hold_open
        self.readers: list[MemoryReader] = []

    def preflight(self, source: str, sinks: Sequence[str], stopping: threading.Event) -> None:
        return None

    def reader(self, topic: str, worker_index: int, worker_count: int) -> MemoryReader:
        reader = MemoryReader(self.broker, topic, worker_index, worker_count, self.hold_open)
        self.readers.append(reader)
        return reader

    def writer(self, topic: str, worker_index: int, report: FailureReport) -> MemoryWriter:
        return MemoryWriter(self.broker, topic, report)


@dataclass
class RunResult:
    """What a test run left in the broker."""

    broker: MemoryBroker
    config: ConfigContext
    commits: list[dict[int, int]] = field(default_factory=list)
    """Every commit call of every worker, in order (to check batching)."""

    def physical(self, topic: str) -> str:
        return self.config.topics.get(topic, topic)

    def records(self, topic: str) -> list[MemoryRecord]:
        """Records of a logical topic, partition by partition."""
        return self.broker.records(self.physical(topic))

    def values(self, topic: str, payload: type[T] | None = None) -> list[Any]:
        """Decoded JSON values of a logical topic (as ``payload`` if given)."""
        decoder = msgspec.json.Decoder(payload) if payload is not None else msgspec.json.Decoder()
        return [decoder.decode(r.value_bytes or b"null") for r in self.records(topic)]

    def dead_letters(self, topic: str) -> list[ErrorEnvelope]:
        """Error envelopes written to a logical dead-letter topic."""
        decoder = msgspec.json.Decoder(ErrorEnvelope)
        return [decoder.decode(r.value_bytes or b"") for r in self.records(topic)]

    def committed(self, topic: str) -> dict[int, int]:
        """Committed offsets of the flow's input topic."""
        return self.broker.committed(self.physical(topic))


class TestRunner:
    """Feed a flow in-memory records and run it to completion on Bytewax.

    Logical topics are bound to physical topics of the same name unless
    ``config`` binds them. Commits are at-least-once, as a service's, unless
    ``config`` (a mapping) sets ``kafka.delivery_guarantee``; a
    :class:`ConfigContext` is used as it is.

    Stateful flows keep their state in memory across the runs of one
    ``TestRunner`` (``state.durability = "volatile"`` unless ``config`` sets
    ``state``), so a second :meth:`run` sees what a restarted service would.
    Time is the test's: :attr:`clock` (a :class:`ManualClock`) stamps records
    sent without ``timestamp_ms`` and moves only with ``run(advance_ms=...)``::

        tester.send({"amount": 2}, key="a", timestamp_ms=1_000)
        tester.send({"amount": 3}, key="a", timestamp_ms=1_500)
        result = tester.run(advance_ms=60_000)  # idle for a minute: windows close
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        flow: StreamFlow[Any, Any],
        *,
        config: ConfigContext | Mapping[str, Any] | None = None,
        partitions: int = 1,
        broker: MemoryBroker | None = None,
        observability_runtime: ObservabilityRuntime | None = None,
    ) -> None:
        if not isinstance(config, ConfigContext):
            data = dict(config or {})
            data["topics"] = {
                **{t: t for t in logical_topics(flow)},
                **data.get("topics", {}),
            }
            data["kafka"] = {"delivery_guarantee": AT_LEAST_ONCE, **data.get("kafka", {})}
            data.setdefault("state", {"durability": "volatile"})
            config = ConfigContext.from_dict(data)
        self.config = config
        self.flow = flow
        self.broker = broker or MemoryBroker(partitions)
        self.runner = StreamingRunner.from_context(
            flow, config=config, observability_runtime=observability_runtime
        )
        self._encode = build_codec(flow.source.codec, flow.source.payload).encode
        self.transport = MemoryTransport(self.broker)
        self.runner.use_transport(self.transport)
        self.clock = ManualClock()
        self.runner.use_clock(self.clock)

    @property
    def input_topic(self) -> str:
        return self.config.topics[self.flow.source.topic]

    def send(
        self,
        value: Any,
        *,
        key: bytes | str | None = None,
        headers: Iterable[tuple[str, bytes]] = (),
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> MemoryRecord:
        """Add an input record; ``bytes`` are sent as is, anything else encoded.

        ``value=None`` sends a tombstone. ``timestamp_ms`` is the record's
        Kafka timestamp (event time by default); without it, the clock's time.
        """
        data = value if value is None or isinstance(value, bytes) else self._encode(value)
        raw_key = key.encode() if isinstance(key, str) else key
        return self.broker.produce(
            self.input_topic,
            data,
            key=raw_key,
            headers=tuple(headers),
            partition=partition,
            timestamp_ms=self.clock.now_ms if timestamp_ms is None else timestamp_ms,
        )

    def send_all(self, values: Iterable[Any]) -> None:
        for value in values:
            self.send(value)

    def run(
        self,
        *,
        runtime: BytewaxRuntimeConfig | None = None,
        error_sinks: Mapping[Any, Any] | None = None,
        until: Callable[[RunResult], bool] | None = None,
        timeout_s: float = 30.0,
        advance_ms: int = 0,
    ) -> RunResult:
        """Run until every sent record is finished; return what was written.

        With ``until``, the input stays open (as a live topic would) until
        ``until(result)`` holds, so time-based behaviour can be observed
        before the final drain; after ``timeout_s`` it closes regardless and
        the caller's assertions report what was missing.

        ``advance_ms``: once every worker has read all input and nothing is
        in flight (async calls, retries) but what state holds, the clock moves
        on by that much, as if the input had been idle that long: windows whose
        end plus grace falls in that time close and are emitted before the
        run ends. Windows still open stay in state for the next run.
        """
        result = RunResult(self.broker, self.config)
        transport = self.transport
        transport.readers.clear()
        transport.hold_open = None
        workers = (runtime or self.config.runtime).workers_per_process
        holds: list[Callable[[], bool]] = []
        if until is not None:
            deadline = time.monotonic() + timeout_s
            holds.append(lambda: not until(result) and time.monotonic() < deadline)
        if advance_ms:
            holds.append(self._advance_when_read(advance_ms, workers))
        if holds:
            transport.hold_open = lambda: any(hold() for hold in holds)
        try:
            self.runner.run(runtime=runtime, error_sinks=error_sinks)
        finally:
            transport.hold_open = None
        result.commits = [commit for reader in transport.readers for commit in reader.commits]
        return result

    def _advance_when_read(self, advance_ms: int, workers: int) -> Callable[[], bool]:
        """Hold the input open until every worker read all of it, then move the clock."""
        pending = True
        lock = threading.Lock()

        def hold() -> bool:
            nonlocal pending
            with lock:
                if not pending:
                    return False
                readers = self.transport.readers
                done = all(reader.polled and reader.read_all() for reader in readers)
                run = self.runner.run_state
                loops = run.workers() if run is not None else []
                settled = len(loops) >= workers and all(loop.settled for loop in loops)
                if len(readers) < workers or not done or not settled:
                    return True
                self.clock.advance(advance_ms)
                pending = False
                return False

        return hold
